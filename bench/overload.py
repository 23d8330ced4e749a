"""Overload benchmark: open-loop arrivals at 1x, 2x and 10x the server's capacity.

    python -m bench.overload --launch                  # starts our stack for the run
    python -m bench.overload --url http://127.0.0.1:8000

Capacity is measured first: requests per second of a closed loop at --concurrency. Each level
then offers Poisson arrivals at a multiple of it for --duration seconds, every request a
streamed chat completion of --max-tokens tokens. Per level: goodput (requests completed whole,
and their tokens, per second of the level), refusals (429/503 before any token, with
Retry-After), failures (any other error), p50/p99 TTFT of the requests admitted, and hung
requests (no answer within --hang-s of arriving): there must be none. Writes
bench/results/overload.json.
"""

import argparse
import asyncio
import contextlib
import json
import pathlib
import random
import time
from dataclasses import asdict, dataclass

import httpx

from bench.load import run_level
from bench.serving import launched_stack, served_model, story_prompts
from bench.stats import percentile

LEVELS = (1.0, 2.0, 10.0)


@dataclass(slots=True)
class Outcome:
    kind: str  # "completed", "refused", "failed" or "hung"
    ttft_s: float | None = None
    num_tokens: int = 0


@dataclass(slots=True)
class Level:
    load: float  # multiple of capacity
    offered_per_s: float
    num_requests: int
    completed: int
    refused: int
    failed: int
    hung: int
    goodput_requests_per_s: float
    goodput_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float

    def line(self) -> str:
        return (
            f"{self.load:4.0f}x {self.offered_per_s:6.1f} req/s offered: {self.completed} done, "
            f"{self.refused} refused, {self.failed} failed, {self.hung} hung; goodput "
            f"{self.goodput_requests_per_s:5.2f} req/s {self.goodput_tokens_per_s:6.1f} tok/s; "
            f"TTFT p50/p99 {self.ttft_p50_ms:6.0f}/{self.ttft_p99_ms:6.0f} ms"
        )


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    ttft, num_tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code in (429, 503):
            await response.aread()
            return Outcome("refused")
        if response.status_code != 200:
            await response.aread()
            return Outcome("failed")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Outcome("failed", ttft, num_tokens)
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                num_tokens += 1
    return Outcome("completed", ttft, num_tokens)


async def offer(url: str, model: str, rate: float, args: argparse.Namespace) -> list[Outcome]:
    """Poisson arrivals at `rate` for args.duration seconds; each request gets args.hang_s."""
    rng = random.Random(int(rate * 1000))
    prompts = story_prompts(64)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=args.hang_s, limits=limits) as client:

        async def guarded(prompt: str) -> Outcome:
            try:
                return await asyncio.wait_for(
                    one(client, model, prompt, args.max_tokens), args.hang_s
                )
            except TimeoutError:
                return Outcome("hung")
            except httpx.HTTPError:
                return Outcome("failed")

        tasks, deadline = [], time.perf_counter() + args.duration
        while time.perf_counter() < deadline:
            tasks.append(asyncio.create_task(guarded(rng.choice(prompts))))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def summarize(load: float, rate: float, outcomes: list[Outcome], elapsed: float) -> Level:
    done = [o for o in outcomes if o.kind == "completed"]
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    count = {kind: sum(o.kind == kind for o in outcomes) for kind in ("refused", "failed", "hung")}
    return Level(
        load=load,
        offered_per_s=rate,
        num_requests=len(outcomes),
        completed=len(done),
        **count,
        goodput_requests_per_s=len(done) / elapsed,
        goodput_tokens_per_s=sum(o.num_tokens for o in done) / elapsed,
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        ttft_p99_ms=percentile(ttfts, 99) * 1e3,
    )


async def measure(url: str, args: argparse.Namespace) -> list[Level]:
    model = served_model(url)
    await run_level(url, model, 2, ["Hello!", "Hi there!"], 8)  # warm-up
    prompts = story_prompts(args.concurrency * 4)
    run = await run_level(url, model, args.concurrency, prompts, args.max_tokens)
    capacity = len(run.results) / run.elapsed_s
    print(f"capacity: {capacity:.2f} req/s (closed loop, c={args.concurrency})", flush=True)
    levels = []
    for load in LEVELS:
        rate = load * capacity
        print(f"  offering {load:.0f}x for {args.duration:.0f} s", flush=True)
        start = time.perf_counter()
        outcomes = await offer(url, model, rate, args)
        level = summarize(load, rate, outcomes, time.perf_counter() - start)
        print(level.line(), flush=True)
        levels.append(level)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--launch", action="store_true", help="start our stack for the run")
    parser.add_argument("--model", default="default", help="model for --launch")
    parser.add_argument("--concurrency", type=int, default=16, help="of the capacity run")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--hang-s",
        type=float,
        default=300.0,
        help="a request still open this long after it arrived counts as hung",
    )
    parser.add_argument("--out", default="bench/results/overload.json")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(launched_stack(args.model, 0)) if args.launch else args.url
        levels = asyncio.run(measure(url, args))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(level) for level in levels], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
