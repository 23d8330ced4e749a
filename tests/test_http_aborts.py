"""HTTP clients that go away at any moment leave no KV behind.

The whole stack (launcher, default model) takes 1,000 requests, 16 at a time, each abandoned
at a moment drawn with a fixed seed: streams dropped after a few chunks, plain requests given
up after up to 0.4 s (while tokenizing, queued, prefilling, moving KV or decoding). Both KV
pools are idle within 5 s afterwards, long before the 30 s lease of any handle could free it.
"""

import asyncio
import random
import time

import httpx
import pytest

from tests.conftest import Stack, start_stack

SEED, NUM_REQUESTS, CONCURRENCY = 11, 1000, 16
IDLE_WITHIN_S = 5.0
WORDS = "river stone garden window letter bridge candle winter market harbor lantern".split()


@pytest.fixture(scope="module")
def stack():
    stack = start_stack()
    yield stack
    stack.stop()


async def abandon(client: httpx.AsyncClient, model: str, rng: random.Random, i: int) -> None:
    prompt = f"{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 400)))
    body = {"model": model, "prompt": prompt, "max_tokens": 64, "ignore_eos": True}
    if i % 2:  # a stream dropped after a few chunks
        chunks = rng.randint(0, 8)
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                chunks -= line.startswith("data: {")
                if chunks < 0:
                    break
        return
    try:  # given up after a while
        await asyncio.wait_for(client.post("/v1/completions", json=body), rng.uniform(0, 0.4))
    except TimeoutError:
        pass


async def storm(url: str, model: str) -> None:
    rng = random.Random(SEED)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with gate:
                await abandon(client, model, random.Random(rng.random()), i)

        await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))


def busy_samples(url: str) -> dict[str, float]:
    """The /metrics samples that must be 0 once nothing is in flight."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    names = (
        "llmserve_kv_blocks_used",
        "llmserve_running_requests",
        "llmserve_waiting_requests",
        "llmserve_requests_in_flight",
    )
    samples = {}
    for line in text.splitlines():
        if line.startswith(names):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_abandoned_http_requests_leave_both_pools_idle(stack: Stack) -> None:
    model = httpx.get(f"{stack.http_url}/v1/models", timeout=30).json()["data"][0]["id"]
    asyncio.run(storm(stack.http_url, model))
    deadline = time.monotonic() + IDLE_WITHIN_S
    while any(busy_samples(stack.http_url).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    samples = busy_samples(stack.http_url)
    assert samples and not any(samples.values()), samples
    body = {"model": model, "prompt": "Still serving:", "max_tokens": 4}
    response = httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
