"""Load generators over streaming chat completions: a closed loop (fixed concurrency) and an
open loop (Poisson arrivals at a fixed rate). A failed request is counted, never fatal."""

import asyncio
import itertools
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.sse_client import HTTPStatusError, SSEClient


@dataclass(slots=True)
class RequestResult:
    ttft_s: float
    itl_s: list[float]
    num_tokens: int
    latency_s: float


@dataclass(slots=True)
class Run:
    """One workload's requests: those that completed, why the others failed, and wall time."""

    results: list[RequestResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


class RequestFailed(Exception):
    """The server streamed an error, or no tokens."""


async def one_request(client: SSEClient, model: str, content: str, max_tokens: int, extra):
    """`extra` adds or overrides body fields (e.g. a response_format) for every request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        # Every request generates max_tokens (Fireworks' and llama.cpp's extension).
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    num_tokens = 0
    async for data in client.events("/v1/chat/completions", body):
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise RequestFailed(f"error in stream: {json.dumps(chunk['error'])[:200]}")
        if chunk.get("usage"):
            num_tokens = chunk["usage"]["completion_tokens"]
        if any(_carries_token(c) for c in chunk.get("choices", [])):
            arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if not arrivals:
        raise RequestFailed("no tokens streamed")
    itl = [b - a for a, b in itertools.pairwise(arrivals)]
    return RequestResult(arrivals[0] - start, itl, num_tokens or len(arrivals), end - start)


def _carries_token(choice: dict) -> bool:
    """A chunk with generated text, or with a token's logprob when logprobs were asked for
    (so a token without text, such as an end-of-turn token under ignore_eos, counts). A
    role-only opening chunk is no token."""
    if (choice.get("logprobs") or {}).get("content"):
        return True
    delta = choice.get("delta", {})
    content = delta.get("content")
    return bool(content) or (content is not None and "role" not in delta)


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        if label and not sys.stdout.isatty():
            print(f"  running {label} ({total} requests)", flush=True)

    def step(self) -> None:
        self.done += 1
        if self.label and sys.stdout.isatty():
            print(f"\r  {self.label}: {self.done}/{self.total}", end="", flush=True)

    def close(self) -> None:
        if self.label and sys.stdout.isatty():
            print("\r" + " " * 60 + "\r", end="", flush=True)


async def _record(run: Run, request: Awaitable[RequestResult], progress: _Progress) -> None:
    try:
        run.results.append(await request)
    except (RequestFailed, HTTPStatusError, OSError, TimeoutError, ValueError) as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
    progress.step()


async def _timed(label: str, total: int, drive: Callable[[Run, _Progress], Awaitable]) -> Run:
    run, progress = Run(), _Progress(label, total)
    start = time.perf_counter()
    await drive(run, progress)
    run.elapsed_s = time.perf_counter() - start
    progress.close()
    return run


async def run_level(
    url: str,
    model: str,
    concurrency: int,
    prompts: list[str],
    max_tokens: int,
    extra: dict | None = None,
    label: str = "",
) -> Run:
    """Closed loop: `concurrency` clients send `prompts` in turn."""
    client = SSEClient(url)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)

    async def drive(run: Run, progress: _Progress) -> None:
        async def worker() -> None:
            while not queue.empty():
                request = one_request(client, model, queue.get_nowait(), max_tokens, extra)
                await _record(run, request, progress)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    return await _timed(label, len(prompts), drive)


async def run_rate(
    url: str,
    model: str,
    rate: float,
    prompts: list[str],
    max_tokens: int,
    seed: int = 0,
    label: str = "",
    extra: dict | None = None,
) -> Run:
    """Open loop: `prompts` sent at Poisson arrivals of `rate` per second, whatever the server's
    pace; wall time runs from the first arrival to the last completion."""
    rng = random.Random(seed)
    client = SSEClient(url)

    async def drive(run: Run, progress: _Progress) -> None:
        tasks = []
        for i, prompt in enumerate(prompts):
            request = one_request(client, model, prompt, max_tokens, extra)
            tasks.append(asyncio.create_task(_record(run, request, progress)))
            if i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)

    return await _timed(label, len(prompts), drive)
