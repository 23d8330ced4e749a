"""Serving benchmark: streaming chat requests against OpenAI-style servers, ours and a peer.

    python -m bench.serving --launch                  # starts our stack on free ports
    python -m bench.serving --launch --peer-url http://127.0.0.1:8100   # llama-server beside it
    python -m bench.serving --launch --rate 2 4 8     # open loop: Poisson arrivals per second

Workloads, each run on every server in turn (interleaved, same requests):
  - closed-loop chat streams at each --concurrency level, and open-loop ones at each --rate
    (Poisson arrivals, requests per second; fixed seed): output tok/s, TTFT and ITL p50/p99,
    and the number of failed requests (a failure is counted, never fatal);
  - a long prompt (--long-words words; 0 skips it): TTFT cold (a prompt no cache has seen),
    then the same prompt again 5 times in a row (prefix cache, KV handoff included; p50 of
    the 5), with logprobs, so that the first token counts even when it has no text.
Chat requests are greedy unless --sampling gives other body fields, e.g.
'{"temperature": 0.7, "top_p": 0.9}', sent to every server alike.
A warm-up round is run and discarded. Prints progress and one line per result, and writes
bench/results/serving.json and serving.png (output tok/s and ITL p50 against concurrency and
against the offered rate).
"""

import argparse
import asyncio
import contextlib
import json
import pathlib
import random
import secrets
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass

import httpx

if not __package__:  # run as `python bench/serving.py`: make `bench` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.load import Run, run_level, run_rate  # noqa: E402
from bench.stats import percentile  # noqa: E402

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
class Summary:
    server: str  # "ours" or "peer"
    workload: str  # "chat" or "long-cold" / "long-again"
    concurrency: int  # closed loop; 0 for an open loop
    rate_per_s: float | None  # open loop: offered requests per second
    num_requests: int  # completed
    num_failed: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float

    def line(self) -> str:
        load = f"r={self.rate_per_s:<4g}" if self.rate_per_s else f"c={self.concurrency:<4}"
        failed = f"  {self.num_failed} failed" if self.num_failed else ""
        return (
            f"{self.server:>4} {self.workload:<10} {load} "
            f"{self.output_tokens_per_s:7.1f} tok/s  TTFT p50/p99 {self.ttft_p50_ms:6.0f}/"
            f"{self.ttft_p99_ms:6.0f} ms  ITL p50/p99 {self.itl_p50_ms:5.1f}/"
            f"{self.itl_p99_ms:5.1f} ms{failed}"
        )


def summarize(
    server: str, workload: str, concurrency: int, run: Run, rate_per_s: float | None = None
) -> Summary:
    results, elapsed = run.results, run.elapsed_s
    itl = [gap for r in results for gap in r.itl_s]
    ttft = [r.ttft_s for r in results]
    return Summary(
        server=server,
        workload=workload,
        concurrency=concurrency,
        rate_per_s=rate_per_s,
        num_requests=len(results),
        num_failed=len(run.errors),
        requests_per_s=len(results) / elapsed,
        output_tokens_per_s=sum(r.num_tokens for r in results) / elapsed,
        ttft_p50_ms=percentile(ttft, 50) * 1e3,
        ttft_p99_ms=percentile(ttft, 99) * 1e3,
        itl_p50_ms=percentile(itl, 50) * 1e3,
        itl_p99_ms=percentile(itl, 99) * 1e3,
    )


def story_prompts(count: int) -> list[str]:
    return [f"Write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(count)]


# The warm long prompt is sent this many times in a row (a single TTFT is too noisy to compare).
LONG_AGAIN_REPEATS = 5
# Long-prompt requests ask for logprobs so that TTFT is the first token's, whatever its text:
# a reply that starts with an end-of-turn token (kept under ignore_eos) has none.
LONG_EXTRA = {"logprobs": True}


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

    def report(summary: Summary, run: Run) -> None:
        print(summary.line(), flush=True)
        for error in sorted(set(run.errors))[:3]:
            print(f"       failed: {error}", flush=True)
        summaries.append(summary)

    for concurrency in args.concurrency:
        prompts = story_prompts(max(args.requests, concurrency))
        for name, url in servers.items():
            label = f"{name} chat c={concurrency}"
            run = await run_level(
                url,
                models[name],
                concurrency,
                prompts,
                args.max_tokens,
                extra=args.sampling,
                label=label,
            )
            report(summarize(name, "chat", concurrency, run), run)
    for rate in args.rate:
        prompts = story_prompts(args.requests)
        for name, url in servers.items():
            label = f"{name} chat r={rate:g}/s"
            run = await run_rate(
                url, models[name], rate, prompts, args.max_tokens, label=label, extra=args.sampling
            )
            report(summarize(name, "chat", 0, run, rate_per_s=rate), run)
    for name, url in servers.items() if args.long_words else ():
        prompt = long_prompt(args.long_words)
        for workload, repeats in (("long-cold", 1), ("long-again", LONG_AGAIN_REPEATS)):
            label = f"{name} {workload} ({args.long_words} words)"
            run = await run_level(
                url, models[name], 1, [prompt] * repeats, 4, extra=LONG_EXTRA, label=label
            )
            report(summarize(name, workload, 1, run), run)
    return summaries


def plot(summaries: list[Summary], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    chat = [s for s in summaries if s.workload == "chat"]
    loops = {
        "concurrent streams": [s for s in chat if not s.rate_per_s],
        "offered requests/s": [s for s in chat if s.rate_per_s],
    }
    loops = {xlabel: runs for xlabel, runs in loops.items() if runs}
    figure, rows = pyplot.subplots(len(loops), 2, figsize=(10, 4 * len(loops)), squeeze=False)
    for (xlabel, runs), (throughput, latency) in zip(loops.items(), rows, strict=True):
        for server in sorted({s.server for s in runs}):
            points = sorted(
                ((s.rate_per_s or s.concurrency, s) for s in runs if s.server == server),
                key=lambda point: point[0],
            )
            xs = [x for x, _ in points]
            throughput.plot(xs, [s.output_tokens_per_s for _, s in points], "o-", label=server)
            latency.plot(xs, [s.itl_p50_ms for _, s in points], "o-", label=server)
        throughput.set(xlabel=xlabel, ylabel="output tokens/s", xscale="log")
        latency.set(xlabel=xlabel, ylabel="inter-token latency p50 (ms)", xscale="log")
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
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="closed-loop levels (default 1 16, no --rate)"
    )
    parser.add_argument(
        "--rate", type=float, nargs="+", default=[], help="open-loop levels, requests per second"
    )
    parser.add_argument("--requests", type=int, default=16, help="requests per level (>= c)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-words", type=int, default=1750, help="words of the long prompt")
    parser.add_argument(
        "--sampling",
        type=json.loads,
        default={},
        help="JSON object of body fields for every chat request (default: greedy)",
    )
    parser.add_argument("--out", default="bench/results/serving.json")
    args = parser.parse_args()
    if not isinstance(args.sampling, dict):
        parser.error("--sampling must be a JSON object")
    if args.concurrency is None:
        args.concurrency = [] if args.rate else [1, 16]

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
