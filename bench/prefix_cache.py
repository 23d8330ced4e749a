"""Prefix-cache benchmark: cold vs warm TTFT, a multi-turn chat replay, KV transfer speed.

    python -m bench.prefix_cache            # starts our stack (and one more prefill) itself

In one run, against the launcher's stack plus a second prefill started with --no-shared-kv:
(a) TTFT of a 2,000-token shared prefix + 32-token suffix, cold (a new isolation key each
time) vs warm (one key, prefix cached): p50 of each and the warm speed-up;
(b) a multi-turn chat replay (conversations sharing a system prompt, each turn appending the
previous answer): cache hit rate (cached / prompt tokens) and TTFT p50/p99;
(c) KV transfer throughput of decode's pull over shared memory and over gRPC, from the
kv_bytes / kv_transfer_ns that Generate reports for a 2,000-token prompt.
Seeds are fixed; warm-up requests are excluded. Prints one summary line and writes
bench/results/prefix_cache.json.
"""

import argparse
import asyncio
import contextlib
import json
import pathlib
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx

from bench.stats import percentile
from services.grpc_server import CHANNEL_OPTIONS
from services.rpc import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED = 1234
TOPICS = ["tides", "volcanoes", "bees", "glaciers", "comets", "deserts", "coral", "owls"]


def read_until(process: subprocess.Popen, marker: str, found: dict[str, str]) -> str:
    """Reads the child's stdout until a line starts with `marker`; records `ready:` lines."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("ready: "):
            _, name, _, address = line.split()
            found[name] = address
        if line.startswith(marker):
            # Keep draining so that the child never blocks on a full pipe.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return line
    raise RuntimeError(f"no {marker!r} line: the process exited")


@contextlib.contextmanager
def launched(model: str) -> Iterator[dict[str, str]]:
    """The launcher's stack plus a --no-shared-kv prefill; yields every address by name."""
    python = [sys.executable, "-m"]
    stack = subprocess.Popen(
        [*python, "services.launcher", "--model", model, "--port", "0", "--grpc-ports", "0,0,0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    extra = subprocess.Popen(
        [*python, "services.prefill", "--model", model, "--port", "0", "--no-shared-kv"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        addresses: dict[str, str] = {}
        line = read_until(stack, "serving the API on ", addresses)
        addresses["http"] = line.split()[4].removesuffix("/v1")
        addresses["prefill_grpc"] = read_until(extra, "prefill serving on ", {}).split()[-1]
        yield addresses
    finally:
        for process in (stack, extra):
            process.terminate()
            process.wait(timeout=30)


async def stream_ttft(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, dict, str]:
    """Seconds to the first streamed token, the final chunk's usage and the streamed text."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    start = time.perf_counter()
    ttft, usage, text = None, {}, ""
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                ttft = ttft or time.perf_counter() - start
                text += choice.get("delta", {}).get("content") or choice.get("text") or ""
    if ttft is None:
        raise RuntimeError("nothing streamed")
    return ttft, usage, text


async def cold_vs_warm(client: httpx.AsyncClient, model: str, args, rng: random.Random) -> dict:
    vocab = range(1000, 40000)
    prefix = [rng.choice(vocab) for _ in range(args.prefix_tokens)]

    def body(key: str) -> dict:
        suffix = [rng.choice(vocab) for _ in range(32)]
        prompt = prefix + suffix
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": 2,
            "prompt_cache_isolation_key": key,
        }

    path = "/v1/completions"
    await stream_ttft(client, path, body("warm"))  # warm-up: caches the prefix under "warm"
    cold, warm, cached = [], [], []
    for i in range(args.runs):
        ttft, _, _ = await stream_ttft(client, path, body(f"cold-{i}"))  # a key nobody used
        cold.append(ttft)
        ttft, usage, _ = await stream_ttft(client, path, body("warm"))
        warm.append(ttft)
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    cold_p50, warm_p50 = statistics.median(cold), statistics.median(warm)
    return {
        "prompt_tokens": args.prefix_tokens + 32,
        "runs": args.runs,
        "cold_ttft_p50_ms": cold_p50 * 1e3,
        "warm_ttft_p50_ms": warm_p50 * 1e3,
        "warm_speedup": cold_p50 / warm_p50,
        "warm_cached_tokens": statistics.median(cached),
    }


async def conversation(client, model: str, system: str, index: int, turns: int) -> list:
    messages = [{"role": "system", "content": system}]
    results = []
    for turn in range(turns):
        topic = TOPICS[(index + turn) % len(TOPICS)]
        messages.append({"role": "user", "content": f"Tell me one more fact about {topic}."})
        body = {"model": model, "messages": messages, "max_tokens": 32}
        ttft, usage, answer = await stream_ttft(client, "/v1/chat/completions", body)
        messages.append({"role": "assistant", "content": answer})
        results.append((ttft, usage["prompt_tokens_details"]["cached_tokens"], usage))
    return results


async def multi_turn(client: httpx.AsyncClient, model: str, args) -> dict:
    system = "You are a patient science teacher. " + " ".join(
        f"Rule {i}: answer in plain words and keep every answer short and exact." for i in range(24)
    )
    await conversation(client, model, "Warm-up system prompt.", 0, 1)
    runs = await asyncio.gather(
        *(conversation(client, model, system, i, args.turns) for i in range(args.conversations))
    )
    flat = [r for run in runs for r in run]
    ttft = [r[0] for r in flat]
    num_cached = sum(r[1] for r in flat)
    num_prompt = sum(r[2]["prompt_tokens"] for r in flat)
    return {
        "conversations": args.conversations,
        "turns": args.turns,
        "requests": len(flat),
        "prompt_tokens": num_prompt,
        "cached_tokens": num_cached,
        "hit_rate": num_cached / num_prompt,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
    }


def transfer(addresses: dict[str, str], prefill_name: str, prompt: list[int], runs: int) -> dict:
    """Moves the whole prompt's KV `runs` times; prefill serves it from its cache each time."""
    with (
        grpc.insecure_channel(addresses[prefill_name], options=CHANNEL_OPTIONS) as p_channel,
        grpc.insecure_channel(addresses["decode"], options=CHANNEL_OPTIONS) as d_channel,
    ):
        prefill = prefill_pb2_grpc.PrefillStub(p_channel)
        decode = decode_pb2_grpc.DecodeStub(d_channel)
        rates, transports, num_bytes = [], set(), 0
        for i in range(runs + 1):  # the first (cold prefill) is a warm-up
            request = prefill_pb2.PrefillRequest(request_id=f"t{i}", token_ids=prompt)
            prefilled = prefill.Prefill(request, timeout=600)
            # A prompt cache of its own for each run: decode's cache serves no block of it
            # (prefill's, keyed without one, serves them all), so every block moves.
            generate = decode_pb2.GenerateRequest(
                request_id=f"t{i}",
                kv_handle=prefilled.kv_handle,
                prompt_token_ids=prompt,
                first_token_id=prefilled.first_token_id,
                stopping=common_pb2.Stopping(max_tokens=2, ignore_eos=True),
                prompt_cache=common_pb2.PromptCache(isolation_key=f"transfer-{i}"),
            )
            joined = list(decode.Generate(generate, timeout=600))[1]
            if i:
                rates.append(joined.kv_bytes / joined.kv_transfer_ns * 1e3)  # MB/s
                transports.add(joined.kv_transport)
                num_bytes = joined.kv_bytes
    return {
        "transport": "/".join(sorted(transports)),
        "kv_bytes": num_bytes,
        "runs": runs,
        "mb_per_s_p50": statistics.median(rates),
        "mb_per_s_min": min(rates),
        "mb_per_s_max": max(rates),
    }


async def http_parts(url: str, args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        rng = random.Random(SEED)
        return {
            "model": model,
            "cold_vs_warm": await cold_vs_warm(client, model, args, rng),
            "multi_turn": await multi_turn(client, model, args),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5, help="cold, warm and transfer runs each")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--out", default="bench/results/prefix_cache.json")
    args = parser.parse_args()

    rng = random.Random(SEED + 1)
    prompt = [rng.randrange(1000, 40000) for _ in range(args.prefix_tokens)]
    with launched(args.model) as addresses:
        results = asyncio.run(http_parts(addresses["http"], args))
        results["transfer"] = [
            transfer(addresses, name, prompt, args.runs) for name in ("prefill", "prefill_grpc")
        ]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    a, b = results["cold_vs_warm"], results["multi_turn"]
    speeds = ", ".join(
        f"{t['transport']} {t['mb_per_s_p50']:.0f} MB/s" for t in results["transfer"]
    )
    print(
        f"prefix cache: TTFT p50 cold {a['cold_ttft_p50_ms']:.0f} ms vs warm "
        f"{a['warm_ttft_p50_ms']:.0f} ms ({a['warm_speedup']:.1f}x); multi-turn hit rate "
        f"{b['hit_rate']:.0%}, TTFT p50/p99 {b['ttft_p50_ms']:.0f}/{b['ttft_p99_ms']:.0f} ms; "
        f"KV transfer p50 {speeds}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
