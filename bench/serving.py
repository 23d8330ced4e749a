"""Serving benchmark: streaming chat requests against OpenAI-style servers, ours and a peer.

    python bench/serving.py --launch                  # starts our stack on free ports
    python bench/serving.py --launch --peer-url http://127.0.0.1:8100   # llama-server beside it

Workloads, each run on every server in turn (interleaved, same requests):
  - closed-loop chat streams at each --concurrency level: output tok/s, TTFT and ITL p50/p99;
  - a long prompt (--long-words words): TTFT cold (a prompt no cache has seen), then the same
    prompt again (prefix cache, KV handoff included).
A warm-up round is run and discarded. Prints progress and one line per result, and writes
bench/results/serving.json and serving.png (output tok/s and ITL p50 against concurrency).
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import pathlib
import random
import secrets
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
WORDS = (
    "river stone garden window morning letter bridge candle winter market orchard harbor "
    "mountain lantern meadow journey silver kitchen thunder valley painter whisper forest "
    "engine station courage shadow island memory season ladder pocket mirror compass"
).split()


@dataclass(slots=True)
class RequestResult:
    ttft_s: float
    itl_s: list[float]
    num_tokens: int
    latency_s: float


@dataclass(slots=True)
class Summary:
    server: str  # "ours" or "peer"
    workload: str  # "chat" or "long-cold" / "long-again"
    concurrency: int
    num_requests: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float

    def line(self) -> str:
        return (
            f"{self.server:>4} {self.workload:<10} c={self.concurrency:<3} "
            f"{self.output_tokens_per_s:7.1f} tok/s  TTFT p50/p99 {self.ttft_p50_ms:6.0f}/"
            f"{self.ttft_p99_ms:6.0f} ms  ITL p50/p99 {self.itl_p50_ms:5.1f}/"
            f"{self.itl_p99_ms:5.1f} ms"
        )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def one_request(client: httpx.AsyncClient, model: str, content: str, max_tokens: int, extra):
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
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            # A token is a chunk with generated text; a role-only opening chunk is not.
            if any(_carries_text(c.get("delta", {})) for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError("no tokens streamed")
    itl = [b - a for a, b in itertools.pairwise(arrivals)]
    return RequestResult(arrivals[0] - start, itl, num_tokens or len(arrivals), end - start)


def _carries_text(delta: dict) -> bool:
    content = delta.get("content")
    return bool(content) or (content is not None and "role" not in delta)


def _client(url: str, concurrency: int) -> httpx.AsyncClient:
    # A fresh connection per request: some servers close a streamed keep-alive connection.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=url, timeout=600, limits=limits)


async def run_level(
    url: str,
    model: str,
    concurrency: int,
    prompts: list[str],
    max_tokens: int,
    extra: dict | None = None,
    label: str = "",
) -> tuple[list[RequestResult], float]:
    """Closed loop: `concurrency` clients send `prompts` in turn; returns results and seconds."""
    async with _client(url, concurrency) as client:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for prompt in prompts:
            queue.put_nowait(prompt)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await one_request(client, model, prompt, max_tokens, extra))
                if label and sys.stdout.isatty():
                    print(f"\r  {label}: {len(results)}/{len(prompts)}", end="", flush=True)

        if label and not sys.stdout.isatty():
            print(f"  running {label} ({len(prompts)} requests)", flush=True)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if label and sys.stdout.isatty():
        print("\r" + " " * 60 + "\r", end="", flush=True)
    return results, elapsed


def summarize(server, workload, concurrency, results, elapsed) -> Summary:
    itl = [gap for r in results for gap in r.itl_s]
    ttft = [r.ttft_s for r in results]
    return Summary(
        server=server,
        workload=workload,
        concurrency=concurrency,
        num_requests=len(results),
        requests_per_s=len(results) / elapsed,
        output_tokens_per_s=sum(r.num_tokens for r in results) / elapsed,
        ttft_p50_ms=percentile(ttft, 50) * 1e3,
        ttft_p99_ms=percentile(ttft, 99) * 1e3,
        itl_p50_ms=percentile(itl, 50) * 1e3,
        itl_p99_ms=percentile(itl, 99) * 1e3,
    )


def story_prompts(count: int) -> list[str]:
    return [f"Write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(count)]


def long_prompt(num_words: int) -> str:
    """The same words for every server; a fresh nonce in front keeps every cache cold."""
    words = random.Random(0).choices(WORDS, k=num_words)
    text = " ".join(words)
    return f"Session {secrets.token_hex(4)}. Summarize these notes in one sentence: {text}"


def served_model(url: str) -> str:
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    return models[0]["id"]


@contextlib.contextmanager
def launched_stack(model: str, port: int, *launcher_args: str):
    """Runs our launcher on free gRPC ports; yields the HTTP base URL."""
    root = pathlib.Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "services.launcher", "--model", model, "--port", str(port)]
    cmd += ["--grpc-ports", "0,0,0", *launcher_args]
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


async def measure(servers: dict[str, str], args: argparse.Namespace) -> list[Summary]:
    models = {name: served_model(url) for name, url in servers.items()}
    for name, url in servers.items():  # warm-up, discarded
        await run_level(url, models[name], 2, ["Hello!", "Hi there!"], 8)
    summaries: list[Summary] = []

    def report(summary: Summary) -> None:
        print(summary.line(), flush=True)
        summaries.append(summary)

    for concurrency in args.concurrency:
        count = max(args.requests, concurrency)
        prompts = story_prompts(count)
        for name, url in servers.items():
            label = f"{name} chat c={concurrency}"
            results, elapsed = await run_level(
                url, models[name], concurrency, prompts, args.max_tokens, label=label
            )
            report(summarize(name, "chat", concurrency, results, elapsed))
    for name, url in servers.items():
        prompt = long_prompt(args.long_words)
        for workload in ("long-cold", "long-again"):
            label = f"{name} {workload} ({args.long_words} words)"
            results, elapsed = await run_level(url, models[name], 1, [prompt], 4, label=label)
            report(summarize(name, workload, 1, results, elapsed))
    return summaries


def plot(summaries: list[Summary], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (throughput, latency) = pyplot.subplots(1, 2, figsize=(10, 4))
    for server in sorted({s.server for s in summaries}):
        chat = sorted(
            (s for s in summaries if s.server == server and s.workload == "chat"),
            key=lambda s: s.concurrency,
        )
        levels = [s.concurrency for s in chat]
        throughput.plot(levels, [s.output_tokens_per_s for s in chat], "o-", label=server)
        latency.plot(levels, [s.itl_p50_ms for s in chat], "o-", label=server)
    throughput.set(xlabel="concurrent streams", ylabel="output tokens/s", xscale="log")
    latency.set(xlabel="concurrent streams", ylabel="inter-token latency p50 (ms)", xscale="log")
    for axes in (throughput, latency):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--launch", action="store_true", help="start our stack for the run")
    parser.add_argument("--model", default="default", help="model for --launch")
    parser.add_argument("--peer-url", help="another OpenAI-compatible server to measure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per level (>= c)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-words", type=int, default=1750, help="words of the long prompt")
    parser.add_argument("--out", default="bench/results/serving.json")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(launched_stack(args.model, 0)) if args.launch else args.url
        servers = {"ours": url, **({"peer": args.peer_url} if args.peer_url else {})}
        results = asyncio.run(measure(servers, args))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
