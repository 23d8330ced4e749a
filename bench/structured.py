"""Structured-output benchmark: decode speed with and without a JSON schema, same requests.

    python -m bench.structured                        # starts our stack on free ports
    python -m bench.structured --url http://127.0.0.1:8000

At each concurrency the same greedy streaming chat requests run plain and constrained by
SCHEMA, every one producing exactly --max-tokens tokens (plain ones ignore EOS; the schema
needs more tokens than that to complete), --repeats times in alternating order. Prints one
line per run, then one summary line with the schema's overhead (medians over repeats) in
output tokens/s and ITL p50/p99, and writes bench/results/structured.json. A warm-up round
of each mode (the grammar's compilation included) is run and discarded.

The grammar's cost per decode step comes from the decode instances' own counters, scraped
from /metrics around each run: the time spent filling and applying the batch's token masks
and advancing the grammars, per constrained step and as a share of the step time. Unlike the
throughput difference, it does not drown in the host's run-to-run noise.
"""

import argparse
import asyncio
import contextlib
import json
import pathlib
import statistics
from dataclasses import asdict
from typing import Any

import httpx

from bench.load import run_level
from bench.serving import launched_stack, served_model, story_prompts, summarize


def text(min_length: int, max_length: int) -> dict[str, Any]:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


# Every string, key and item costs tokens, so no output completes within 96 or so.
CHAPTER = {
    "type": "object",
    "properties": {
        "title": text(8, 60),
        "summary": text(24, 200),
        "mood": {"enum": ["calm", "tense", "joyful", "sad"]},
        "pages": {"type": "integer", "minimum": 1, "maximum": 999},
    },
    "required": ["title", "summary", "mood", "pages"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "title": text(8, 60),
        "chapters": {"type": "array", "items": CHAPTER, "minItems": 8, "maxItems": 8},
    },
    "required": ["title", "chapters"],
    "additionalProperties": False,
}
MODES: dict[str, dict[str, Any]] = {
    "plain": {"ignore_eos": True},
    "schema": {
        "ignore_eos": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "story", "schema": SCHEMA, "strict": True},
        },
    },
}


METRICS = {
    "output_tokens_per_s": True,
    "itl_p50_ms": False,
    "itl_p99_ms": False,
    "step_ms": False,
}
# Decode counters from /metrics, summed over decode instances.
DECODE_COUNTERS = (
    "llmserve_steps_total",
    "llmserve_step_seconds_total",
    "llmserve_grammar_steps_total",
    "llmserve_grammar_seconds_total",
)


def decode_counters(url: str) -> dict[str, float]:
    totals = dict.fromkeys(DECODE_COUNTERS, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, rest = line.partition("{")
        if name in totals and 'service="decode"' in rest:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def step_costs(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean decode step time and grammar time per constrained step over one run, in ms."""
    grew = {name: after[name] - before[name] for name in DECODE_COUNTERS}
    steps, grammar_steps = grew["llmserve_steps_total"], grew["llmserve_grammar_steps_total"]
    step_ms = 1e3 * grew["llmserve_step_seconds_total"] / steps if steps else 0.0
    grammar_ms = (
        1e3 * grew["llmserve_grammar_seconds_total"] / grammar_steps if grammar_steps else 0.0
    )
    return {
        "decode_steps": steps,
        "step_ms": step_ms,
        "grammar_steps": grammar_steps,
        "grammar_ms_per_step": grammar_ms,
        "grammar_share_pct": 100 * grammar_ms / step_ms if step_ms else 0.0,
    }


def overhead_pct(plain: float, constrained: float, higher_is_better: bool) -> float:
    """How much worse the constrained figure is, in % of the plain one."""
    change = (plain - constrained) if higher_is_better else (constrained - plain)
    return 100 * change / plain


async def measure(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs each level --repeats times, alternating which mode goes first, so that drift in
    the host's load lands on both modes alike."""
    model = served_model(url)
    for extra in MODES.values():
        await run_level(url, model, 2, story_prompts(2), 8, extra)  # warm-up, discarded
    rows = []
    for concurrency in args.concurrency:
        num_requests = max(args.min_requests, args.rounds * concurrency)
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
            for mode in order:
                before = decode_counters(url)
                run = await run_level(
                    url,
                    model,
                    concurrency,
                    story_prompts(num_requests),
                    args.max_tokens,
                    MODES[mode],
                )
                summary = summarize("ours", mode, concurrency, run)
                costs = step_costs(before, decode_counters(url))
                tokens_per_request = summary.output_tokens_per_s / summary.requests_per_s
                print(
                    f"{mode:>6} c={concurrency} #{repeat}: "
                    f"{summary.output_tokens_per_s:.1f} tok/s, {tokens_per_request:.0f} "
                    f"tok/request, ITL p50/p99 {summary.itl_p50_ms:.1f}/"
                    f"{summary.itl_p99_ms:.1f} ms, TTFT p50 {summary.ttft_p50_ms:.0f} ms, "
                    f"step {costs['step_ms']:.1f} ms, grammar {costs['grammar_ms_per_step']:.2f} "
                    f"ms/step ({costs['grammar_share_pct']:.1f}% of the step)",
                    flush=True,
                )
                row = {"mode": mode, "repeat": repeat, "tokens_per_request": tokens_per_request}
                rows.append(row | asdict(summary) | costs)
    return rows


def medians(rows: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """Per concurrency and mode, the median over repeats of each metric."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["concurrency"], row["mode"]), []).append(row)
    table: dict[int, dict[str, dict[str, float]]] = {}
    for (concurrency, mode), group in groups.items():
        table.setdefault(concurrency, {})[mode] = {
            metric: statistics.median(r[metric] for r in group)
            for metric in (*METRICS, "grammar_ms_per_step", "grammar_share_pct")
        }
    return table


def overheads(table: dict[int, dict[str, dict[str, float]]]) -> dict[int, dict[str, float]]:
    return {
        concurrency: {
            f"{metric}_pct": overhead_pct(
                by_mode["plain"][metric], by_mode["schema"][metric], higher_is_better
            )
            for metric, higher_is_better in METRICS.items()
        }
        for concurrency, by_mode in table.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="measure this server instead of launching our stack")
    parser.add_argument("--model", default="default", help="model for the launched stack")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per level = rounds * c")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many per level")
    parser.add_argument("--repeats", type=int, default=2, help="runs per (mode, level)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default="bench/results/structured.json")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(launched_stack(args.model, 0))
        rows = asyncio.run(measure(url, args))
    table = medians(rows)
    overhead = overheads(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "max_tokens": args.max_tokens,
        "schema": SCHEMA,
        "runs": rows,
        "medians": table,
        "overhead_pct": overhead,
    }
    out.write_text(json.dumps(report, indent=2))
    print(
        f"wrote {out}; summary: "
        + "; ".join(
            f"c={c} {table[c]['plain']['output_tokens_per_s']:.1f} -> "
            f"{table[c]['schema']['output_tokens_per_s']:.1f} tok/s, overhead "
            f"{o['output_tokens_per_s_pct']:+.1f}% tok/s, {o['itl_p50_ms_pct']:+.1f}% ITL p50, "
            f"{o['itl_p99_ms_pct']:+.1f}% ITL p99, {o['step_ms_pct']:+.1f}% step time; grammar "
            f"{table[c]['schema']['grammar_ms_per_step']:.2f} ms/step = "
            f"{table[c]['schema']['grammar_share_pct']:.1f}% of the step"
            for c, o in overhead.items()
        )
    )


if __name__ == "__main__":
    main()
