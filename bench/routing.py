"""Routing benchmark: 2 prefill + 2 decode instances, cache-aware against round-robin prefill
routing, on the same workloads.

    python -m bench.routing
    python -m bench.routing --prefill-kv-tokens 32768   # caches that hold everything
    python -m bench.routing --prefill 4                 # more prefill instances

For each policy the launcher starts the stack (`--prefill 2 --decode 2`) and runs:

1. Multi-turn chat: --conversations conversations at once, each --turns turns. A
   conversation opens with a document of its own (about 250 tokens) and asks a question per
   turn; each turn sends the whole history back, after a random (seeded) think time, as chat
   users do. Hit rate = cached prompt tokens / prompt tokens, from each response's usage.
   Prefill's KV pool is --prefill-kv-tokens per instance: by default, room for about half
   the conversations' histories at once, as in a loaded deployment, where cache-aware
   routing keeps each conversation's history on one instance instead of copies on all.
   Round-robin sends a turn to the instance of the conversation's previous turn 1 / (number
   of prefill instances) of the time, so with 2 instances its hit rate stays above about
   half of cache-aware's; the gap grows with the number of instances.
2. Distinct prompts: --distinct completions with no prefix in common, --concurrency at once.
   Load per instance = the change in its requests and tokens counters (/metrics), and the
   spread = max / min between the two instances of a stage.

Prints one line per (policy, workload) and writes bench/results/routing.json.
"""

import argparse
import asyncio
import json
import pathlib
import random
from typing import Any

import httpx

from bench.serving import launched_stack, served_model

WORDS = (
    "river engine lantern orbit maple copper harbor signal meadow quartz falcon ledger "
    "canyon violet timber saddle comet pepper glacier anchor willow cipher marble tundra "
    "beacon velvet summit walnut ember tide prism hollow cobalt thistle garnet drift "
    "harvest island jasper kettle lagoon mosaic nectar opal parcel quiver ripple"
).split()
LOAD_COUNTERS = ("llmserve_instance_requests_total", "llmserve_instance_tokens_total")


def text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


async def conversation(
    client: httpx.AsyncClient, model: str, index: int, args: argparse.Namespace
) -> list[dict[str, int]]:
    """One user's chat; returns each turn's usage."""
    rng = random.Random(index)
    opening = f"Notes {index}: {text(rng, 180)}\n\nQuestion 1: what are these notes about?"
    messages = [{"role": "user", "content": opening}]
    usages = []
    for turn in range(args.turns):
        await asyncio.sleep(rng.uniform(0, args.think_s))
        body = {"model": model, "messages": messages, "max_tokens": args.max_tokens}
        reply = (await client.post("/v1/chat/completions", json=body | {"temperature": 0})).json()
        usages.append(reply["usage"])
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        messages.append({"role": "user", "content": f"Question {turn + 2}: {text(rng, 8)}?"})
    return usages


async def multi_turn(url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    before = load_counters(url)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        runs = await asyncio.gather(
            *(conversation(client, model, i, args) for i in range(args.conversations))
        )
    usages = [usage for run in runs for usage in run]
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    return {
        "requests": len(usages),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt,
    } | load_since(url, before)


def load_counters(url: str) -> dict[tuple[str, str, str], float]:
    """(counter, service, instance) -> value, for prefill and decode instances."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, rest = line.partition("{")
        if name in LOAD_COUNTERS:
            labels = dict(part.split("=", 1) for part in rest.split("}")[0].split(","))
            key = (name, labels["service"].strip('"'), labels["instance"].strip('"'))
            values[key] = float(line.rsplit(" ", 1)[1])
    return values


def load_since(url: str, before: dict[tuple[str, str, str], float]) -> dict[str, Any]:
    """Each instance's requests and tokens since `before`, and per stage and counter the
    spread: the busiest instance's count over the idlest's."""
    load: dict[str, dict[str, dict[str, float]]] = {}
    for (counter, service, instance), value in load_counters(url).items():
        grew = value - before.get((counter, service, instance), 0.0)
        kind = counter.removeprefix("llmserve_instance_").removesuffix("_total")
        load.setdefault(service, {}).setdefault(kind, {})[instance] = grew
    spread = {
        f"{service}_{kind}": max(per.values()) / max(min(per.values()), 1)
        for service, kinds in load.items()
        for kind, per in kinds.items()
    }
    return {"load": load, "spread": spread}


async def distinct(url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    before = load_counters(url)
    rng = random.Random(1000)
    prompts = [f"#{i:03d} {text(rng, 60)}" for i in range(args.distinct)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = {"model": model, "prompt": queue.get_nowait(), "max_tokens": args.max_tokens}
            (await client.post("/v1/completions", json=body)).raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    return load_since(url, before)


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    model = served_model(url)
    return {
        "multi_turn": await multi_turn(url, model, args),
        "distinct": await distinct(url, model, args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--think-s", type=float, default=1.0, help="longest pause before a turn")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--distinct", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=2, help="prefill instances")
    parser.add_argument("--decode", type=int, default=2, help="decode instances")
    parser.add_argument("--prefill-kv-tokens", type=int, default=4608)
    parser.add_argument("--decode-kv-tokens", type=int, default=16384)
    parser.add_argument("--out", default="bench/results/routing.json")
    args = parser.parse_args()

    results = {}
    for policy in args.policies:
        launcher_args = (
            f"--prefill={args.prefill}",
            f"--decode={args.decode}",
            f"--prefill-args=--kv-cache-tokens {args.prefill_kv_tokens}",
            f"--decode-args=--kv-cache-tokens {args.decode_kv_tokens}",
            f"--frontend-args=--prefill-routing {policy}",
        )
        with launched_stack(args.model, 0, *launcher_args) as url:
            results[policy] = result = asyncio.run(measure(url, args))
        turns = result["multi_turn"]
        print(
            f"{policy}: multi-turn hit rate {100 * turns['hit_rate']:.1f}% "
            f"({turns['cached_tokens']}/{turns['prompt_tokens']} prompt tokens, "
            f"{turns['requests']} requests, prefill requests spread "
            f"{turns['spread']['prefill_requests']:.2f}x); distinct prompts spread "
            + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(result["distinct"]["spread"].items())),
            flush=True,
        )
    if {"cache_aware", "round_robin"} <= results.keys():
        ratio = (
            results["cache_aware"]["multi_turn"]["hit_rate"]
            / results["round_robin"]["multi_turn"]["hit_rate"]
        )
        print(f"cache-aware / round-robin multi-turn hit rate: {ratio:.2f}x")
        results["hit_rate_ratio"] = ratio
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
