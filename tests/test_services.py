"""The tokenizer, prefill and decode services over real gRPC, with the default model on CPU.

Each service runs once as its own process on an ephemeral port and serves every test here.
Generation is checked token for token against the engine run directly in this process.
"""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.engine import kernels
from services.engine.tokenizer import Tokenizer
from services.rpc import common_pb2, decode_pb2, tokenizer_pb2
from tests.engine_reference import Reference
from tests.grpc_stack import (
    DECODE_KV_TOKENS,
    MAX_BATCH,
    PREFILL_KV_TOKENS,
    Stack,
    rpc_error,
    tokens_of,
)

pytest_plugins = ["tests.grpc_fixtures"]

SERVICE_NAMES = {
    "tokenizer": "tokenizer.v1.Tokenizer",
    "prefill": "prefill.v1.Prefill",
    "decode": "decode.v1.Decode",
}
STORY = "Once upon a time, in a small village,"
QUESTION = "What is the capital of France?"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
UNSET, STOP, LENGTH = (
    decode_pb2.FINISH_REASON_UNSPECIFIED,
    decode_pb2.FINISH_REASON_STOP,
    decode_pb2.FINISH_REASON_LENGTH,
)


@pytest.fixture
def stack(services_stack: Stack) -> Stack:
    return services_stack


@pytest.fixture
def reference(engine_reference: Reference) -> Reference:
    return engine_reference


@pytest.fixture
def tok(default_tokenizer: Tokenizer) -> Tokenizer:
    return default_tokenizer


def chat_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(tok.render_chat([{"role": "user", "content": text}], True))


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_health_and_reflection(stack, name):
    health = health_pb2_grpc.HealthStub(stack.channels[name])
    for service in ("", SERVICE_NAMES[name]):
        request = health_pb2.HealthCheckRequest(service=service)
        assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(stack.channels[name]).get_services()
    assert SERVICE_NAMES[name] in services
    assert "grpc.health.v1.Health" in services


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_info(stack, name):
    info = stack.info(name)
    assert (info.service, info.instance) == (name, stack.services[name].address)
    model = info.model
    assert (model.model_id, model.architecture) == ("SmolLM2-135M-Instruct", "llama")
    assert (model.vocab_size, model.context_length, model.device) == (49152, 8192, "cpu")
    assert model.eos_token_ids == [2, 0]  # <|im_end|>, <|endoftext|>
    assert info.limits.max_model_len == 8192
    if name == "tokenizer":
        return
    num_blocks = {"prefill": PREFILL_KV_TOKENS, "decode": DECODE_KV_TOKENS}[name] // 16
    assert (model.dtype, model.block_size, info.limits.num_kv_blocks) == ("float32", 16, num_blocks)
    # The default engine: the GGUF's own blocks on our kernels, batch invariant.
    assert (model.weight_format, model.batch_invariant) == ("gguf:Q4_1+Q8_0", True)
    assert model.kernels == kernels.cpu_variant()
    assert info.stats.num_free_blocks + info.stats.num_used_blocks == num_blocks
    if name == "prefill":
        assert info.limits.max_prefill_tokens == 256
    else:
        assert info.limits.max_batch_size == MAX_BATCH


def test_tokenize_text_and_ids(stack, tok):
    text = "Hello, world! Ünïcödé and   spaces\n"
    response = stack.tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text=text))
    assert list(response.token_ids) == tok.encode(text) and response.prompt == text
    ids = tokenizer_pb2.TokenIds(ids=[0, 5, 49151])
    response = stack.tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(token_ids=ids))
    assert list(response.token_ids) == [0, 5, 49151]
    for bad in ([49152], [-1]):
        ids = tokenizer_pb2.TokenIds(ids=[1, *bad])
        request = tokenizer_pb2.TokenizeRequest(token_ids=ids)
        assert rpc_error(stack.tokenizer.Tokenize, request).code() == INVALID


def test_render_chat(stack, tok):
    messages = [("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "Bye")]
    request = tokenizer_pb2.RenderChatRequest(
        messages=[tokenizer_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        add_generation_prompt=True,
    )
    response = stack.tokenizer.RenderChat(request)
    assert response.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert all(f"<|im_start|>{r}\n{c}<|im_end|>" in response.prompt for r, c in messages)
    assert list(response.token_ids) == tok.encode(response.prompt)
    for bad in ([tokenizer_pb2.ChatMessage(role="wizard", content="x")], []):
        request = tokenizer_pb2.RenderChatRequest(messages=bad)
        assert rpc_error(stack.tokenizer.RenderChat, request).code() == INVALID


def test_detokenize_round_trip(stack, tok):
    text = "Round trip: 日本語, emoji 🙂, code `x = 1`."
    ids = tok.encode(text)
    response = stack.tokenizer.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=ids))
    assert response.text == text
    bad = tokenizer_pb2.DetokenizeRequest(token_ids=[1, 49152])
    assert rpc_error(stack.tokenizer.Detokenize, bad).code() == INVALID


def test_greedy_generation_matches_engine(stack, reference, tok):
    prompt = tok.encode(STORY)
    expected = reference.greedy(prompt, 12)
    assert len(expected) == 12  # no EOS: the limit ends it
    request = stack.generate_request(prompt, max_tokens=12)
    handle = request.kv_handle
    assert (handle.num_tokens, handle.num_blocks) == (len(prompt), -(-len(prompt) // 16))
    assert handle.prefill_address == stack.services["prefill"].address
    responses = list(stack.decode.Generate(request, timeout=120))
    assert tokens_of(responses) == expected
    assert list(responses[0].token_ids) == [request.first_token_id]
    assert [r.num_generated for r in responses] == list(range(1, 13))
    assert [r.finish_reason for r in responses] == [UNSET] * 11 + [LENGTH]
    assert "".join(r.text for r in responses) == tok.decode(expected, skip_special_tokens=True)
    joined = responses[1]  # the first token after the KV pull
    assert joined.queue_ns > 0 and joined.kv_transfer_ns > 0
    config = reference.config
    itemsize = reference.pool.cache.element_size()  # the services' default KV dtype
    per_block = 16 * config.num_kv_heads * config.head_dim * itemsize
    assert joined.kv_bytes == config.num_layers * 2 * handle.num_blocks * per_block
    assert [r.kv_bytes for r in responses if r is not joined] == [0] * 11
    assert stack.wait_idle("prefill").num_used_blocks == 0
    assert stack.wait_idle("decode").num_used_blocks == 0


def test_eos_finishes_with_stop(stack, reference, tok):
    expected = reference.greedy(chat_ids(tok, QUESTION), 64)
    assert expected[-1] in reference.config.eos_token_ids
    responses = stack.generate(chat_ids(tok, QUESTION), max_tokens=64)
    assert tokens_of(responses) == expected
    assert responses[-1].finish_reason == STOP
    text = "".join(r.text for r in responses)
    assert text == tok.decode(expected, skip_special_tokens=True) and "Paris" in text


@pytest.mark.parametrize("stop", ["of France", "Paris"])
def test_stop_string_cuts_text(stack, reference, tok, stop):
    expected = reference.greedy(chat_ids(tok, QUESTION), 64)
    full = tok.decode(expected, skip_special_tokens=True)
    assert stop in full
    responses = stack.generate(chat_ids(tok, QUESTION), max_tokens=64, stop=["xyzzy", stop])
    # Joined deltas end right before the stop string: no delta held any of it or what follows.
    assert "".join(r.text for r in responses) == full[: full.index(stop)]
    assert responses[-1].finish_reason == STOP
    assert len(responses) < len(expected)  # generation ended at the stop string, not at EOS
    assert stack.wait_idle("decode").num_used_blocks == 0


def test_stop_string_kept_when_asked(stack, reference, tok):
    full = tok.decode(reference.greedy(chat_ids(tok, QUESTION), 64), skip_special_tokens=True)
    stop = "of France"
    responses = stack.generate(
        chat_ids(tok, QUESTION), max_tokens=64, stop=[stop], include_stop_str=True
    )
    assert "".join(r.text for r in responses) == full[: full.index(stop) + len(stop)]
    assert responses[-1].finish_reason == STOP


def test_single_token_releases_handle(stack, tok):
    responses = stack.generate(tok.encode(STORY), max_tokens=1)
    assert len(responses) == 1 and responses[0].finish_reason == LENGTH
    assert responses[0].kv_bytes == 0  # never pulled: released instead
    assert stack.wait_idle("prefill").num_pinned_handles == 0


def test_seeded_sampling_repeats(stack, tok):
    prompt = chat_ids(tok, "Tell me a short story about a dragon.")

    def sample(seed: int) -> list[int]:
        sampling = common_pb2.SamplingParams(temperature=1.0, seed=seed)
        return tokens_of(stack.generate(prompt, 16, sampling=sampling, ignore_eos=True))

    first = sample(1234)
    assert len(first) == 16
    assert sample(1234) == first
    assert sample(99) != first
