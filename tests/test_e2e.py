"""The real four-process stack, driven by the official `openai` and `fireworks-ai` clients."""

import asyncio

import grpc
import openai
import pytest
from fireworks import Fireworks

from services.rpc import common_pb2, decode_pb2_grpc

QUESTION = "What is the capital of France?"


def test_chat_answers_paris(client, model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_equals_non_stream(client, model):
    kwargs = dict(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "stop"
    assert final[0].usage is not None and final[0].usage.completion_tokens > 0


def test_completion_length_limit(client, model):
    reply = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_completion_stream(client, model):
    kwargs = dict(model=model, prompt="The three primary colors are", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices
    )
    assert streamed == whole and whole


def test_chat_text_ends_with_the_stop_string(client, model):
    """Chat keeps the matched stop string (the chat reference), streamed or whole;
    include_stop_str_in_output=false cuts it."""
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=32,
        stop=["Paris"],
    )
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "stop"
    text = reply.choices[0].message.content
    assert text.endswith("Paris") and text.count("Paris") == 1
    chunks = client.chat.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    cut = client.chat.completions.create(**kwargs, extra_body={"include_stop_str_in_output": False})
    assert cut.choices[0].message.content == text.removesuffix("Paris")


def test_seed_reproduces_sampling(client, model):
    kwargs = dict(
        model=model, prompt="My favourite animal is", max_tokens=16, temperature=1.0, seed=1234
    )
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


def test_errors_have_the_openai_shape(client, model):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert err.value.body["param"] == "temperature"


def test_fireworks_client(stack, model):
    client = Fireworks(base_url=stack.http_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32
    )
    assert "Paris" in reply.choices[0].message.content
    completion = client.completions.create(
        model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0
    )
    assert completion.choices[0].text
    streamed = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=32,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == reply.choices[0].message.content


def test_sixteen_concurrent_streams_are_batched(stack, model):
    client = openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    prompts = [f"Count from {i} to {i + 20}, separated by commas." for i in range(16)]

    async def stream(prompt: str) -> tuple[str, str]:
        chunks = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
        text, finish = "", None
        async for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all():
        return await asyncio.gather(*(stream(p) for p in prompts))

    results = asyncio.run(run_all())
    # Each concurrent answer equals the same request made alone (greedy is deterministic).
    sync = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    for prompt, (text, finish) in zip(prompts[:3], results[:3], strict=True):
        alone = sync.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=24,
        ).choices[0]
        assert (text, finish) == (alone.message.content, alone.finish_reason)
    assert all(text and finish in ("stop", "length") for text, finish in results)
    with grpc.insecure_channel(stack.addresses["decode"]) as channel:
        info = decode_pb2_grpc.DecodeStub(channel).Info(common_pb2.InfoRequest())
    assert info.stats.max_step_batch_size > 1
    assert info.stats.num_running == 0


CACHE_PROMPT = "Prefix caching check. " + " ".join(
    f"Fact {i}: {i} squared is {i * i}." for i in range(40)
)


def cached_tokens(client, model, **extra) -> tuple[int, int]:
    """(cached_tokens, prompt_tokens) of a short greedy completion of CACHE_PROMPT."""
    usage = client.completions.create(
        model=model, prompt=CACHE_PROMPT, max_tokens=2, temperature=0, extra_body=extra or None
    ).usage
    return usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens


def test_repeated_prompt_reports_cached_tokens(client, model):
    key = {"prompt_cache_isolation_key": "e2e-tenant-a"}
    cold, num_prompt = cached_tokens(client, model, **key)
    warm, _ = cached_tokens(client, model, **key)
    assert num_prompt > 100 and cold == 0
    # Every prompt token but the last, which is always computed.
    assert warm == num_prompt - 1
    assert cached_tokens(client, model, prompt_cache_isolation_key="e2e-tenant-b")[0] == 0
    assert cached_tokens(client, model, **key, prompt_cache_max_len=40)[0] == 40
    raw = client.completions.with_raw_response.create(
        model=model, prompt=CACHE_PROMPT, max_tokens=2, temperature=0, extra_body=key
    )
    assert raw.headers["fireworks-cached-prompt-tokens"] == str(warm)
    assert raw.parse().usage.prompt_tokens_details.cached_tokens == warm


def test_context_length_exceeded_behavior(client, model):
    messages = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=8
    )
    room = 8192 - first.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=9000,
            extra_body={"context_length_exceeded_behavior": "error"},
        )
    assert err.value.status_code == 400
    assert err.value.body["param"] == "max_tokens"
    assert f"by {9000 - room} tokens" in err.value.body["message"]
    # The default, "truncate", lowers max_tokens to the room the prompt leaves.
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=9000
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert "Paris" in reply.choices[0].message.content
