"""Serving benchmark: N concurrent streaming chat requests against an OpenAI-style server.

    python bench/serving.py --launch                  # starts our stack on free ports
    python bench/serving.py --url http://127.0.0.1:8000 --peer-url http://127.0.0.1:8080

Prints one summary line per (server, concurrency) and writes bench/results/serving.json:
requests/s, output tokens/s, TTFT and inter-token latency p50/p99. A warm-up round is run
and discarded. With --peer-url a second server (e.g. llama.cpp's llama-server on the same
GGUF) is measured in the same run with the same requests.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import pathlib
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import httpx

TOPICS = [
    "a lighthouse keeper",
    "a robot learning to paint",
    "the history of bread",
    "a trip to Mars",
    "a dragon who is afraid of heights",
    "the ocean at night",
    "a city made of glass",
    "an old clock",
    "a chess tournament",
    "a forest in winter",
    "a jazz musician",
    "the first snowfall",
    "a lost cat finding home",
    "a library at midnight",
    "a mountain village",
    "a time traveller's mistake",
]


@dataclass(slots=True)
class RequestResult:
    ttft_s: float
    itl_s: list[float]
    num_tokens: int
    latency_s: float


@dataclass(slots=True)
class Summary:
    server: str
    concurrency: int
    num_requests: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def one_request(
    client: httpx.AsyncClient, model: str, index: int, max_tokens: int, extra: dict | None = None
):
    """`extra` adds or overrides body fields (e.g. a response_format) for every request."""
    body = {
        "model": model,
        "messages": [
            {"role": "user", "content": f"Write a long story about {TOPICS[index % 16]}."}
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    num_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError("no tokens streamed")
    itl = [b - a for a, b in itertools.pairwise(arrivals)]
    return RequestResult(arrivals[0] - start, itl, num_tokens or len(arrivals), end - start)


async def run_level(
    url: str,
    model: str,
    concurrency: int,
    num_requests: int,
    max_tokens: int,
    extra: dict | None = None,
):
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(num_requests):
            queue.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                results.append(await one_request(client, model, index, max_tokens, extra))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    itl = [gap for r in results for gap in r.itl_s]
    ttft = [r.ttft_s for r in results]
    return Summary(
        server=url,
        concurrency=concurrency,
        num_requests=num_requests,
        requests_per_s=num_requests / elapsed,
        output_tokens_per_s=sum(r.num_tokens for r in results) / elapsed,
        ttft_p50_ms=percentile(ttft, 50) * 1e3,
        ttft_p99_ms=percentile(ttft, 99) * 1e3,
        itl_p50_ms=percentile(itl, 50) * 1e3,
        itl_p99_ms=percentile(itl, 99) * 1e3,
    )


def served_model(url: str) -> str:
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    return models[0]["id"]


@contextlib.contextmanager
def launched_stack(model: str, port: int, *launcher_args: str):
    """Runs our launcher on free gRPC ports; yields the HTTP base URL."""
    root = pathlib.Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        "-m",
        "services.launcher",
        "--model",
        model,
        "--port",
        str(port),
        "--grpc-ports",
        "0,0,0",
        *launcher_args,
    ]
    process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("serving the API on "):
                break
        else:
            raise RuntimeError("the stack did not start")
        # Keep draining so that the children never block on a full pipe.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield line.split()[4].removesuffix("/v1")
    finally:
        process.terminate()
        process.wait(timeout=30)


async def measure(url: str, args: argparse.Namespace) -> list[Summary]:
    model = served_model(url)
    await run_level(url, model, 2, 2, 8)  # warm-up, discarded
    summaries = []
    for concurrency in args.concurrency:
        num_requests = max(args.requests, concurrency)
        summary = await run_level(url, model, concurrency, num_requests, args.max_tokens)
        print(
            f"{url} c={concurrency}: {summary.requests_per_s:.2f} req/s, "
            f"{summary.output_tokens_per_s:.1f} tok/s, TTFT p50/p99 "
            f"{summary.ttft_p50_ms:.0f}/{summary.ttft_p99_ms:.0f} ms, ITL p50/p99 "
            f"{summary.itl_p50_ms:.0f}/{summary.itl_p99_ms:.0f} ms",
            flush=True,
        )
        summaries.append(summary)
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--launch", action="store_true", help="start our stack for the run")
    parser.add_argument("--model", default="default", help="model for --launch")
    parser.add_argument("--peer-url", help="another OpenAI-compatible server to measure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per level (>= c)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/results/serving.json")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(launched_stack(args.model, 0)) if args.launch else args.url
        results = asyncio.run(measure(url, args))
        if args.peer_url:
            results += asyncio.run(measure(args.peer_url, args))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(
        f"wrote {out}; summary: "
        + "; ".join(f"c={r.concurrency} {r.output_tokens_per_s:.1f} tok/s" for r in results)
    )


if __name__ == "__main__":
    main()
