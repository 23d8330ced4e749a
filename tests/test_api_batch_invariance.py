"""Through the real stack: a request's greedy tokens and logprobs are bitwise the same alone,
beside 15 other requests of other lengths, with its prompt prefix from the prefix cache (on
prefill and on decode, whole blocks and part of one), with its prompt computed by decode
itself (the default stack sends a prompt decode mostly holds there), and prefilled in several
chunks by another stack that sends every prompt to prefill, or computed in several chunks by
decode on a third."""

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


async def alone_and_beside(url: str, model: str, local_prefill: bool) -> tuple[tuple, tuple, tuple]:
    """With `local_prefill`, TARGET (over 256 tokens) is prefilled the first time and computed
    by decode, from the blocks decode pulled, once it is cached; else prefill computes it
    every time, reusing part of a block the second time."""
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
    partly_cached = partly.usage.prompt_tokens_details.cached_tokens
    # Decode reuses whole blocks only; prefill also the start of a block.
    assert partly_cached > 0 if local_prefill else partly_cached % 16 != 0
    assert numbers(partly.choices[0]) == numbers(cached.choices[0])
    return numbers(alone.choices[0]), numbers(beside[0].choices[0]), numbers(cached.choices[0])


@pytest.fixture(scope="module")
def chunking_stack():
    stack = start_stack(
        "--prefill-args=--max-prefill-tokens 32", "--frontend-args=--local-prefill-tokens 0"
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def decode_chunking_stack():
    stack = start_stack("--decode-args=--max-chunk-tokens 4")
    yield stack
    stack.stop()


def test_tokens_and_logprobs_do_not_depend_on_the_batch_or_the_cache(stack, model):
    alone, beside, cached = asyncio.run(alone_and_beside(stack.http_url, model, True))
    assert len(alone[1]) == 24
    assert beside == alone
    assert cached == alone


def test_chunked_prefill_gives_the_same_numbers(stack, chunking_stack, model):
    expected, _, _ = asyncio.run(alone_and_beside(stack.http_url, model, True))
    chunked, _, _ = asyncio.run(alone_and_beside(chunking_stack.http_url, model, False))
    assert chunked == expected


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 1.0, "seed": 11}, {"extra_body": {"mirostat_target": 3.0}, "seed": 5}],
    ids=["seeded", "mirostat"],
)
def test_decode_samples_a_prompt_it_computed_as_prefill_does(
    stack, chunking_stack, model, sampling
):
    """A short prompt is computed by decode on the default stack and by prefill on the other:
    the first token (sampled where the prompt was computed) and the rest are the same."""
    fields = {"prompt": "A short story about a lighthouse:", "max_tokens": 16, "logprobs": 2}

    def sample(url: str) -> tuple:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=model, **fields, **sampling)
        return numbers(reply.choices[0])

    assert sample(stack.http_url) == sample(chunking_stack.http_url)


def test_decode_computing_a_prompt_in_chunks_gives_the_same_numbers(
    stack, decode_chunking_stack, model
):
    """Decode computes the prompt in one pass on the default stack, 4 tokens a step on the
    other (running beside another request there)."""
    prompt = "A short story about a lighthouse keeper and her dog:"
    greedy = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 3}

    def sample(url: str) -> tuple:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=model, **greedy)
        assert reply.usage.prompt_tokens > 8  # at least three chunks on the other stack
        return numbers(reply.choices[0])

    async def beside_another(url: str) -> tuple:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        long_running = client.completions.create(
            model=model, prompt="Count: 1, 2, 3,", max_tokens=64, extra_body={"ignore_eos": True}
        )
        _, reply = await asyncio.gather(long_running, asyncio.to_thread(sample, url))
        return reply

    assert asyncio.run(beside_another(decode_chunking_stack.http_url)) == sample(stack.http_url)
