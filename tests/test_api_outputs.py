"""What the real stack's responses show: logprobs, echo, token ids, prompts, usage, metrics."""

import json
import uuid

import httpx
import pytest
import torch
from fireworks import Fireworks

from tests.conftest import STACK_DTYPE

CAPITAL = "The capital of France is"
QUESTION = "What is 2+2?"


@pytest.fixture(scope="module")
def post(stack, model):
    """Raw JSON: (status, body, headers) of a POST to /v1/<path>."""

    def post(path: str, **body):
        url = f"{stack.http_url}/v1/{path}"
        response = httpx.post(url, json={"model": model, **body}, timeout=120)
        return response.status_code, response.json(), response.headers

    return post


def completion(post, prompt, max_tokens=4, **fields) -> dict:
    status, body, _ = post("completions", prompt=prompt, max_tokens=max_tokens, **fields)
    assert status == 200, body
    return body


def chat(post, messages, max_tokens=4, **fields) -> dict:
    status, body, _ = post("chat/completions", messages=messages, max_tokens=max_tokens, **fields)
    assert status == 200, body
    return body


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_completion_logprobs_describe_the_text(post):
    body = completion(post, CAPITAL, max_tokens=8, temperature=0, logprobs=2)
    choice = body["choices"][0]
    lps = choice["logprobs"]
    assert "".join(lps["tokens"]) == choice["text"]
    assert len(lps["token_ids"]) == body["usage"]["completion_tokens"] == 8
    assert lps["text_offset"] == [len("".join(lps["tokens"][:i])) for i in range(8)]
    entries = zip(lps["tokens"], lps["token_logprobs"], lps["top_logprobs"], strict=True)
    for token, logprob, top in entries:
        assert len(top) >= 2 and top[token] == logprob <= 0
        # Greedy takes the argmax, so its token is the likeliest of the alternatives.
        assert logprob == max(top.values())


def test_logprobs_are_the_raw_distribution_whatever_the_temperature(post):
    """Tokens sampled hot carry the logprobs the untempered model gives them: the same as the
    prompt logprobs of those tokens echoed back."""
    hot = completion(
        post, CAPITAL, max_tokens=6, temperature=1.8, seed=5, logprobs=1, return_token_ids=True
    )["choices"][0]
    ids = hot["prompt_token_ids"] + hot["token_ids"]
    echoed = completion(post, ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    prompt_lps = echoed["choices"][0]["logprobs"]["token_logprobs"][len(hot["prompt_token_ids"]) :]
    # Prefill scores the sequence at once, decode a token at a time: the same in float32 up to
    # rounding, a few percent apart in bfloat16. Tempered logprobs would be far off either way.
    tolerance = {"abs": 1e-3} if STACK_DTYPE == torch.float32 else {"rel": 0.05, "abs": 0.05}
    assert prompt_lps[:6] == pytest.approx(hot["logprobs"]["token_logprobs"], **tolerance)


def test_chat_logprobs_with_alternatives(post):
    body = chat(post, user("Hi"), temperature=0, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        alternatives = entry["top_logprobs"]
        assert len({a["token"] for a in alternatives}) == 3
        logprobs = [a["logprob"] for a in alternatives]
        assert logprobs == sorted(logprobs, reverse=True)
        assert alternatives[0]["token"] == entry["token"]


def test_echo_prepends_the_prompt(post):
    plain = completion(post, CAPITAL, max_tokens=3, temperature=0)["choices"][0]["text"]
    echoed = completion(post, CAPITAL, max_tokens=3, temperature=0, echo=True, logprobs=1)
    choice, usage = echoed["choices"][0], echoed["usage"]
    assert choice["text"] == CAPITAL + plain
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"]
    # The first prompt token has no context, so no logprob; every later one has.
    assert lps["token_logprobs"][0] is None
    assert all(isinstance(lp, float) for lp in lps["token_logprobs"][1:])
    last_two = completion(post, CAPITAL, max_tokens=3, temperature=0, echo_last=2, logprobs=1)
    assert last_two["choices"][0]["text"] == " France is" + plain
    assert last_two["choices"][0]["logprobs"]["tokens"][:2] == [" France", " is"]


def test_max_tokens_0_scores_the_prompt(post, client, model):
    """The legacy scoring call (lm-eval's loglikelihood): the prompt echoed with its logprobs,
    the same as when a token is generated after it, and no token."""
    scored = completion(post, CAPITAL, max_tokens=0, echo=True, logprobs=1)
    choice, usage = scored["choices"][0], scored["usage"]
    assert choice["text"] == CAPITAL and choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0
    num_prompt = usage["prompt_tokens"]
    lps = choice["logprobs"]
    generated = completion(post, CAPITAL, max_tokens=1, temperature=0, echo=True, logprobs=1)
    reference = generated["choices"][0]["logprobs"]
    assert lps["tokens"] == reference["tokens"][:num_prompt]
    assert lps["token_logprobs"][0] is None
    assert lps["token_logprobs"][1:] == pytest.approx(
        reference["token_logprobs"][1:num_prompt], abs=1e-4
    )
    stream = client.completions.create(
        model=model, prompt=CAPITAL, max_tokens=0, echo=True, logprobs=1, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == CAPITAL
    assert chunks[-1].choices[0].finish_reason == "length"


def test_return_token_ids_match_usage(post):
    body = completion(post, CAPITAL, max_tokens=5, temperature=0, return_token_ids=True)
    choice, usage = body["choices"][0], body["usage"]
    assert len(choice["prompt_token_ids"]) == usage["prompt_tokens"]
    assert len(choice["token_ids"]) == usage["completion_tokens"] == 5
    # Fed back as a token-id prompt, the ids reproduce the prompt and its continuation.
    again = completion(post, choice["prompt_token_ids"], max_tokens=5, temperature=0)
    assert again["choices"][0]["text"] == choice["text"]


def test_raw_output_shows_the_rendered_prompt(post):
    body = chat(post, user(QUESTION), temperature=0, raw_output=True, return_token_ids=True)
    choice = body["choices"][0]
    raw = choice["raw_output"]
    assert raw["prompt_token_ids"] == choice["prompt_token_ids"]
    assert len(raw["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    assert raw["completion"] == choice["message"]["content"]
    assert raw["completion_token_ids"] == choice["token_ids"]
    assert f"user\n{QUESTION}" in raw["prompt_fragments"][0]


def test_prompt_lists_and_token_id_prompts(post):
    prompts = [CAPITAL, "One plus one is"]
    both = completion(post, prompts, temperature=0)["choices"]
    singles = [completion(post, p, temperature=0, return_token_ids=True) for p in prompts]
    assert [c["index"] for c in both] == [0, 1]
    assert [c["text"] for c in both] == [s["choices"][0]["text"] for s in singles]
    ids = [s["choices"][0]["prompt_token_ids"] for s in singles]
    by_ids = completion(post, ids[0], temperature=0)["choices"]
    assert [c["text"] for c in by_ids] == [both[0]["text"]]
    lists = completion(post, ids, temperature=0)["choices"]
    assert [c["text"] for c in lists] == [c["text"] for c in both]


def test_chat_message_forms(post):
    def render(messages) -> tuple[str, str]:
        choice = chat(post, messages, temperature=0, raw_output=True)["choices"][0]
        return choice["raw_output"]["prompt_fragments"][0], choice["message"]["content"]

    prompt, answer = render(user(QUESTION))
    # SmolLM2's chat template has no place for a name: accepted, rendered as without it.
    assert render([{"role": "user", "content": QUESTION, "name": "ann"}]) == (prompt, answer)
    assert render(user([{"type": "text", "text": QUESTION}])) == (prompt, answer)
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    assert render(user(parts)) == render(user("What is\n2+2?"))
    with_tool = [
        *user(QUESTION),
        {"role": "assistant", "content": "Let me compute it."},
        {"role": "tool", "content": "4", "tool_call_id": "call_1"},
    ]
    tool_prompt, _ = render(with_tool)
    assert tool_prompt.startswith(prompt.removesuffix("<|im_start|>assistant\n"))
    # SmolLM2's template writes roles as given: a result is a turn of role "tool".
    assert "<|im_start|>tool\n4<|im_end|>\n" in tool_prompt


def test_prompt_truncate_len_evicts_the_earliest_turns(post):
    messages = [{"role": "system", "content": "You are Zed the pirate."}]
    for i in range(6):
        messages += [
            {"role": "user", "content": f"Tell me fact number {i} about the sea."},
            {"role": "assistant", "content": f"Fact {i}: the sea is deep and salty."},
        ]
    messages += user("Who are you?")
    whole = chat(post, messages, max_tokens=2, temperature=0)
    assert whole["usage"]["prompt_tokens"] > 150
    cut = chat(post, messages, max_tokens=2, temperature=0, prompt_truncate_len=64, raw_output=True)
    assert cut["usage"]["prompt_tokens"] <= 64
    prompt = cut["choices"][0]["raw_output"]["prompt_fragments"][0]
    assert "You are Zed the pirate." in prompt and "Who are you?" in prompt
    assert "fact number 0" not in prompt and "fact number 5" in prompt


def test_context_length_exceeded_behavior(post):
    room = 8192 - chat(post, user(QUESTION), max_tokens=2, temperature=0)["usage"]["prompt_tokens"]
    request = dict(messages=user(QUESTION), max_tokens=9000, temperature=0)
    status, body, _ = post("chat/completions", **request, context_length_exceeded_behavior="error")
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert f"by {9000 - room} tokens" in body["error"]["message"]
    # "truncate" lowers max_tokens to the room the prompt leaves, as the sampling header shows.
    behavior = {"context_length_exceeded_behavior": "truncate"}
    status, body, headers = post("chat/completions", **request, **behavior)
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert json.loads(headers["fireworks-sampling-options"])["max_tokens"] == room


def test_stream_include_usage_adds_a_usage_chunk(client, model):
    kwargs = dict(model=model, prompt=CAPITAL, max_tokens=4, temperature=0, stream=True)
    chunks = list(client.completions.create(**kwargs, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert "".join(c.choices[0].text for c in chunks[:-1]) == " Paris.\n\n"


def test_continuous_usage_stats_on_every_chunk(client, model):
    """As GuideLLM and vLLM's benchmark client ask for it."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    stream = client.chat.completions.create(
        model=model,
        messages=user(QUESTION),
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options=options,  # type: ignore[typeddict-unknown-key]
    )
    *chunks, usage_only = list(stream)
    assert all(c.usage is not None for c in chunks)
    completion_tokens = [c.usage.completion_tokens for c in chunks]
    assert completion_tokens == sorted(completion_tokens)
    assert usage_only.choices == [] and usage_only.usage.completion_tokens == completion_tokens[-1]
    assert chunks[-1].usage.total_tokens == usage_only.usage.total_tokens


def test_perf_metrics_in_body_and_headers(post, client, model):
    fields = dict(prompt=CAPITAL, max_tokens=2, temperature=0.7, top_p=0.9, seed=1)
    status, body, headers = post("completions", **fields, perf_metrics_in_response=True)
    assert status == 200
    metrics = body["perf_metrics"]
    assert metrics["prompt-tokens"] == str(body["usage"]["prompt_tokens"])
    assert (
        0 < float(metrics["server-time-to-first-token"]) <= float(metrics["server-processing-time"])
    )
    for name, value in metrics.items():
        assert headers[f"fireworks-{name}"] == value
    options = json.loads(headers["fireworks-sampling-options"])
    assert (options["temperature"], options["top_p"], options["max_tokens"]) == (0.7, 0.9, 2)
    assert "perf_metrics" not in post("completions", **fields)[1]
    # Streaming: in the body of the chunk that carries the finish reason, and only there.
    chunks = client.completions.create(
        model=model, **fields, stream=True, extra_body={"perf_metrics_in_response": True}
    )
    streamed = [(c.choices[0].finish_reason, c.model_extra.get("perf_metrics")) for c in chunks]
    assert [p for _, p in streamed if p] == [p for f, p in streamed if f]
    assert [p["prompt-tokens"] for _, p in streamed if p] == [metrics["prompt-tokens"]]


def test_accepted_fields_leave_greedy_output_unchanged(post):
    plain = chat(post, user(QUESTION), max_tokens=6, temperature=0)["choices"][0]["message"]
    extra = dict(user="user-42", metadata={"trace": "abc"}, reasoning_effort="low")
    same = chat(post, user(QUESTION), max_tokens=6, temperature=0, **extra)
    assert same["choices"][0]["message"] == plain
    for name, value in (("images", ["data:image/png;base64,AAAA"]), ("frobnicate", 1)):
        status, body, _ = post("chat/completions", messages=user(QUESTION), **{name: value})
        assert status == 400 and body["error"]["param"] == name
        assert name in body["error"]["message"]


def test_prompt_cache_isolation_and_max_len(post):
    prompt = "Cache check. " + " ".join(f"Item {i} costs {i * 3} coins." for i in range(25))
    key = f"tenant-{uuid.uuid4().hex}"

    def cached(**fields) -> tuple[int, int]:
        usage = completion(post, prompt, max_tokens=1, temperature=0, **fields)["usage"]
        return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]

    cold, num_prompt = cached(prompt_cache_isolation_key=key)
    assert 150 < num_prompt and cold == 0
    # Every prompt token but the last, which is always computed.
    assert cached(prompt_cache_isolation_key=key)[0] == num_prompt - 1
    assert cached(prompt_cache_isolation_key=f"other-{key}")[0] == 0
    # Cached up to the length the request allows, even inside a block.
    assert cached(prompt_cache_isolation_key=key, prompt_cache_max_len=40)[0] == 40


def test_fireworks_client_with_fireworks_fields(stack, client, model):
    fireworks = Fireworks(base_url=stack.http_url, api_key="unused", max_retries=0)
    kwargs = dict(model=model, prompt=CAPITAL, max_tokens=4, temperature=0, logprobs=2, n=2)
    reply = fireworks.completions.create(**kwargs)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.text == " Paris.\n\n" == "".join(choice.logprobs.tokens)
        assert choice.logprobs.token_ids == [7042, 30, 198, 198]
    streamed = fireworks.chat.completions.create(
        model=model, messages=user(QUESTION), max_tokens=6, temperature=0, n=2, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    whole = client.chat.completions.create(
        model=model, messages=user(QUESTION), max_tokens=6, temperature=0
    )
    assert texts == dict.fromkeys((0, 1), whole.choices[0].message.content)


def test_metrics_after_traffic(stack, post):
    def scrape() -> str:
        return httpx.get(f"{stack.http_url}/metrics", timeout=30).text

    def value(text: str, sample: str) -> float:
        [line] = [line for line in text.splitlines() if line.startswith(sample + " ")]
        return float(line.split()[-1])

    ttft = "llmserve_time_to_first_token_seconds_count"
    before = scrape()
    usage = completion(post, CAPITAL, max_tokens=2, temperature=0)["usage"]
    after = scrape()
    assert value(after, ttft) == value(before, ttft) + 1
    prompts = "llmserve_prompt_tokens_total"
    assert value(after, prompts) == value(before, prompts) + usage["prompt_tokens"]
    assert 'llmserve_time_to_first_token_seconds_bucket{le="+Inf"}' in after
    for service in ("prefill", "decode"):
        labels = f'{{instance="{stack.addresses[service]}",service="{service}"}}'
        queried = value(after, f"llmserve_prefix_cache_queried_blocks_total{labels}")
        assert queried >= value(after, f"llmserve_prefix_cache_hit_blocks_total{labels}") >= 0
        assert value(after, f"llmserve_kv_blocks_free{labels}") > 0
        assert value(after, f"llmserve_kv_blocks_used{labels}") >= 0
        assert value(after, f"llmserve_steps_total{labels}") > 0
        assert value(after, f"llmserve_instance_requests_total{labels}") > 0
        assert value(after, f"llmserve_instance_tokens_total{labels}") > 0
        assert value(after, f"llmserve_step_seconds_total{labels}") > 0
    decode = f'{{instance="{stack.addresses["decode"]}",service="decode"}}'
    grammar_steps = f"llmserve_grammar_steps_total{decode}"
    grammar_seconds = f"llmserve_grammar_seconds_total{decode}"
    json_mode = {"response_format": {"type": "json_object"}, "ignore_eos": True}
    generated = completion(post, CAPITAL, max_tokens=4, temperature=0, **json_mode)["usage"]
    constrained = scrape()
    # The first token comes from prefill; each later one from a constrained decode step.
    assert generated["completion_tokens"] == 4
    assert value(constrained, grammar_steps) >= value(after, grammar_steps) + 3
    assert value(constrained, grammar_seconds) > value(after, grammar_seconds)
