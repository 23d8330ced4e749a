"""Speculative decoding over real gRPC with the real model: a prediction (or prompt lookup)
changes how many forward passes decode runs, never what it generates.

Greedy tokens and logprobs must be bitwise the same with any prediction, as must a seeded
sampled output (each position draws from (seed, position), and a verified position's logits
are those of a plain step: our kernels compute a token the same way in any batch or chunk).
"""

import json

import grpc
import pytest

from services.engine.tokenizer import Tokenizer
from services.rpc import common_pb2, decode_pb2
from tests.grpc_stack import ENGINE_ARGS, GREEDY, Stack, rpc_error, running, start_service

pytest_plugins = ["tests.grpc_fixtures"]

QUESTION = "What is the capital of France? Answer in two sentences."
STORY = "Once upon a time, in a small village,"
QUOTE_DOC = (
    "The committee met on Tuesday. The committee agreed that the budget for the new library "
    "would be raised to four million dollars, and that construction would begin in spring."
)


@pytest.fixture(scope="module")
def stack(services_stack: Stack) -> Stack:
    return services_stack


def chat_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(tok.render_chat([{"role": "user", "content": text}], True))


def generate(
    stack: Stack,
    prompt: list[int],
    max_tokens: int,
    prediction: list[int] = (),
    decode: str = "decode",
    **kwargs,
) -> list[decode_pb2.GenerateResponse]:
    request = stack.generate_request(prompt, max_tokens, **kwargs)
    request.prediction_token_ids.extend(prediction)
    return list(stack.decode_stub(decode).Generate(request, timeout=120))


def tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def logprobs(responses) -> list[tuple]:
    return [
        (lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
        for r in responses
        for lp in r.logprobs
    ]


def edited(output: list[int]) -> list[int]:
    """The output with a few tokens in the middle replaced and one inserted: a prediction that
    is right before and after an edit."""
    middle = len(output) // 2
    return [*output[:middle], 17, 4242, 99, *output[middle + 2 :]]


WRONG = list(range(1000, 1200))


@pytest.mark.parametrize("text", [QUESTION, STORY])
def test_greedy_tokens_and_logprobs_are_the_same_with_any_prediction(
    stack, default_tokenizer, text
):
    tok = default_tokenizer
    prompt = chat_ids(tok, text) if text == QUESTION else tok.encode(text)
    sampling = common_pb2.SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)
    plain = generate(stack, prompt, 48, sampling=sampling)
    output = tokens(plain)
    assert not plain[-1].HasField("speculation")  # no prediction, no prompt lookup here
    for prediction in (output, edited(output), WRONG):
        responses = generate(stack, prompt, 48, prediction, sampling=sampling)
        assert tokens(responses) == output
        assert logprobs(responses) == logprobs(plain)
        assert "".join(r.text for r in responses) == "".join(r.text for r in plain)
        assert [r.num_generated for r in responses] == list(range(1, len(output) + 1))
        assert [r.finish_reason for r in responses] == [r.finish_reason for r in plain]
        spec = responses[-1].speculation
        assert spec.prediction_tokens == len(prediction)
        assert spec.accepted_tokens <= spec.draft_tokens
        assert sum(spec.drafted_by_position) == spec.draft_tokens
        assert sum(spec.accepted_by_position) == spec.accepted_tokens
        if prediction is output:
            # Every token after prefill's first came from a verified draft but a step's last.
            assert spec.accepted_tokens >= len(output) // 2
    assert stack.wait_idle("decode").num_used_blocks == 0


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1.0, "seed": 1234},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 7},
        {"temperature": 1.0, "seed": 3, "frequency_penalty": 0.5, "presence_penalty": 0.3},
        {"temperature": 0.0, "repetition_penalty": 1.3},
    ],
)
def test_sampled_and_penalized_outputs_are_the_same_with_a_prediction(
    stack, default_tokenizer, options
):
    prompt = chat_ids(default_tokenizer, "Tell me a short story about a dragon.")
    sampling = common_pb2.SamplingParams(**options, logprobs=True)
    plain = generate(stack, prompt, 40, sampling=sampling, ignore_eos=True)
    output = tokens(plain)
    for prediction in (output, edited(output)):
        responses = generate(stack, prompt, 40, prediction, sampling=sampling, ignore_eos=True)
        assert tokens(responses) == output
        assert logprobs(responses) == logprobs(plain)
    assert responses[-1].speculation.accepted_tokens > 0


def test_stop_strings_cut_the_same_text_when_drafts_run_past_them(stack, default_tokenizer):
    prompt = chat_ids(default_tokenizer, QUESTION)
    full = generate(stack, prompt, 48)
    text = "".join(r.text for r in full)
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    plain = generate(stack, prompt, 48, stop=[stop])
    responses = generate(stack, prompt, 48, tokens(full), stop=[stop])
    assert "".join(r.text for r in responses) == "".join(r.text for r in plain)
    assert tokens(responses) == tokens(plain)
    assert responses[-1].finish_reason == decode_pb2.FINISH_REASON_STOP
    assert responses[-1].num_generated == len(tokens(plain))
    assert stack.wait_idle("decode").num_used_blocks == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_constrained_output_is_the_same_with_a_prediction(
    stack, default_tokenizer, temperature
):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    grammar = common_pb2.Grammar(kind="json_schema", source=json.dumps(schema), strict=True)
    sampling = common_pb2.SamplingParams(temperature=temperature, seed=5, grammar=grammar)
    prompt = chat_ids(default_tokenizer, "Describe a city as JSON.")
    plain = generate(stack, prompt, 64, sampling=sampling)
    output = tokens(plain)
    # A prediction that breaks the grammar: drafts it forbids are never accepted.
    not_json = default_tokenizer.encode("city: Paris, population: lots")
    for prediction in (output, edited(output), not_json):
        responses = generate(stack, prompt, 64, prediction, sampling=sampling)
        assert tokens(responses) == output
    if plain[-1].finish_reason == decode_pb2.FINISH_REASON_STOP:
        json.loads("".join(r.text for r in plain))


def test_mirostat_requests_ignore_the_prediction(stack, default_tokenizer):
    prompt = chat_ids(default_tokenizer, QUESTION)
    sampling = common_pb2.SamplingParams(temperature=1.0, seed=11, mirostat_target=3.0)
    plain = generate(stack, prompt, 24, sampling=sampling, ignore_eos=True)
    responses = generate(stack, prompt, 24, tokens(plain), sampling=sampling, ignore_eos=True)
    assert tokens(responses) == tokens(plain)
    assert not responses[-1].HasField("speculation")


def test_bad_predictions_are_invalid_arguments(stack, default_tokenizer):
    prompt = default_tokenizer.encode(STORY)
    vocab_size = stack.info("decode").model.vocab_size
    for prediction, message in (([5, vocab_size], "prediction_token_ids"), ([-1], "in [0")):
        request = stack.generate_request(prompt, 8)
        request.prediction_token_ids.extend(prediction)
        error = rpc_error(lambda r: list(stack.decode.Generate(r, timeout=60)), request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.details()
    assert stack.wait_idle("prefill").num_pinned_handles == 0


@pytest.fixture(scope="module")
def prompt_lookup(stack: Stack):
    """A second decode instance with prompt lookup on, beside the session's."""
    services = {
        "decode_lookup": start_service(
            "decode", *ENGINE_ARGS, "--kv-cache-tokens", "2048", "--prompt-lookup"
        )
    }
    with running(services):
        lookup = Stack({**stack.services, **services})
        yield lookup
        lookup.close()


def test_prompt_lookup_drafts_from_the_prompt_and_keeps_the_output(
    stack, prompt_lookup, default_tokenizer
):
    prompt = chat_ids(default_tokenizer, QUOTE_DOC + "\n\nQuote the second sentence exactly.")
    plain = generate(stack, prompt, 48, sampling=GREEDY)
    looked_up = generate(prompt_lookup, prompt, 48, decode="decode_lookup", sampling=GREEDY)
    assert tokens(looked_up) == tokens(plain)
    spec = looked_up[-1].speculation
    assert spec.prediction_tokens == 0
    assert spec.draft_tokens > 0 and spec.accepted_tokens > 0
    # A prediction takes precedence over prompt lookup.
    predicted = generate(
        prompt_lookup, prompt, 48, tokens(plain), decode="decode_lookup", sampling=GREEDY
    )
    assert tokens(predicted) == tokens(plain)
    assert predicted[-1].speculation.prediction_tokens == len(tokens(plain))
