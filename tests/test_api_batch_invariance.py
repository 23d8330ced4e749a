"""Through the real stack: a request's greedy tokens and logprobs are bitwise the same alone,
beside 15 other requests of other lengths, with its prompt prefix from the prefix cache (on
prefill and on decode, whole blocks and part of one), and prefilled in several chunks by
another stack."""

import asyncio
import uuid

import openai
import pytest

from tests.conftest import start_stack

TARGET = "Invariance check. " + " ".join(f"Item {i} costs {3 * i + 1} coins." for i in range(30))
OTHERS = [
    "Hello " * (1 + 9 * i) + f"and goodbye number {i}." for i in range(15)
]  # 3 to ~270 tokens


DETOUR = " and then something else entirely, nothing like the rest of it at all, the end."


def request(cache_key: str, prompt: str = TARGET) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": 3,
        "extra_body": {"prompt_cache_isolation_key": cache_key, "ignore_eos": True},
    }


def numbers(choice) -> tuple:
    lp = choice.logprobs
    return (choice.text, lp.tokens, lp.token_logprobs, lp.top_logprobs)


async def alone_and_beside(url: str, model: str) -> tuple[tuple, tuple, tuple]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    alone = await client.completions.create(model=model, **request("invariance-a"))
    beside = await asyncio.gather(
        client.completions.create(model=model, **request("invariance-b")),
        *(client.completions.create(model=model, **request("other", p)) for p in OTHERS),
    )
    cached = await client.completions.create(model=model, **request("invariance-a"))
    usage = cached.usage.prompt_tokens_details
    assert usage is not None and usage.cached_tokens > 0  # the prefix came from the cache
    # A prompt that leaves TARGET inside a KV block: TARGET then reuses part of that block.
    fresh = f"invariance-{uuid.uuid4().hex}"
    await client.completions.create(model=model, **request(fresh, TARGET[:200] + DETOUR))
    partly = await client.completions.create(model=model, **request(fresh))
    assert partly.usage.prompt_tokens_details.cached_tokens % 16 != 0
    assert numbers(partly.choices[0]) == numbers(cached.choices[0])
    return numbers(alone.choices[0]), numbers(beside[0].choices[0]), numbers(cached.choices[0])


@pytest.fixture(scope="module")
def chunking_stack():
    stack = start_stack("--prefill-args=--max-prefill-tokens 32")
    yield stack
    stack.stop()


def test_tokens_and_logprobs_do_not_depend_on_the_batch_or_the_cache(stack, model):
    alone, beside, cached = asyncio.run(alone_and_beside(stack.http_url, model))
    assert len(alone[1]) == 24
    assert beside == alone
    assert cached == alone


def test_chunked_prefill_gives_the_same_numbers(stack, chunking_stack, model):
    expected, _, _ = asyncio.run(alone_and_beside(stack.http_url, model))
    chunked, _, _ = asyncio.run(alone_and_beside(chunking_stack.http_url, model))
    assert chunked == expected
