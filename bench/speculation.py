"""Speculative decoding benchmark: end-to-end latency with and without predicted outputs, and
with prompt lookup on and off.

    python -m bench.speculation --launch        # starts our stack twice (lookup off, on)
    python -m bench.speculation --url http://127.0.0.1:8000    # code edit only

Code edit (the predicted-outputs use case): a chat request asks for a small change to a
~150-line source file and the whole file back, greedy. Each request runs with
  - no prediction;
  - `edited`: the file with the change made, what an editor sends as the prediction;
  - `exact`: the reply itself (from the run without a prediction), a prediction that is
    right wherever the model follows the file: the bound the edited file reaches with a
    model that copies it;
  - `wrong`: another file of the same size, a prediction that never matches.
Every mode must give the same reply (greedy output does not depend on the prediction); the
bench stops if one differs. Quote (prompt lookup): a document and a request to quote part of
it, greedy, on a stack whose decode has --prompt-lookup and on one without.

Modes run in turn, --repeats times, after a warm-up round (so every mode finds the prompt in
the prefix cache); medians are reported. Writes bench/results/speculation.json.
"""

import argparse
import contextlib
import json
import pathlib
import statistics
import time
from typing import Any

import httpx

from bench.serving import launched_stack, served_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
EDITED_FILE = ROOT / "frontend" / "run" / "choice.py"
OTHER_FILE = ROOT / "frontend" / "stages" / "types.py"
RENAME = ("ChoiceOutput", "ChoiceResult")
QUOTE_DOCUMENT = "\n\n".join(
    f"Section {i}. The {topic} committee reported that the {topic} budget for the year would be "
    f"{amount} million dollars, that {count} new staff would be hired, and that the review of "
    f"the {topic} programme would finish before the end of the {season}."
    for i, (topic, amount, count, season) in enumerate(
        [
            ("library", 4, 12, "spring"),
            ("transport", 19, 40, "summer"),
            ("housing", 31, 25, "autumn"),
            ("parks", 2, 6, "winter"),
            ("schools", 27, 80, "spring"),
            ("water", 11, 9, "summer"),
        ],
        start=1,
    )
)


def edit_messages() -> list[dict[str, str]]:
    source = EDITED_FILE.read_text()
    old, new = RENAME
    return [
        {
            "role": "user",
            "content": f"Rename the class `{old}` to `{new}` everywhere in this file. Reply "
            f"with the whole updated file only.\n\n```python\n{source}```",
        }
    ]


def quote_messages() -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": f"{QUOTE_DOCUMENT}\n\nQuote sections 3, 4 and 5 above exactly, word for "
            "word.",
        }
    ]


def chat(url: str, model: str, messages, max_tokens: int, **extra: Any) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "perf_metrics_in_response": True,
        **extra,
    }
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    reply = response.json()
    metrics = reply.get("perf_metrics", {})
    return {
        "seconds": elapsed,
        "text": reply["choices"][0]["message"]["content"],
        "completion_tokens": reply["usage"]["completion_tokens"],
        "ttft_s": float(metrics.get("server-time-to-first-token", 0)),
        "matched": int(metrics.get("speculation-prompt-matched-tokens", 0)),
        "drafted": int(metrics.get("speculation-generated-tokens", 0)),
        "acceptance": metrics.get("speculation-acceptance", ""),
    }


def run_modes(
    url: str, model: str, messages, max_tokens: int, modes: dict[str, dict], repeats: int
) -> dict[str, dict[str, Any]]:
    """Runs every mode `repeats` times in turn after one discarded round; checks that every
    mode's reply is the first mode's; returns medians per mode."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for round_index in range(repeats + 1):
        for name, extra in modes.items():
            result = chat(url, model, messages, max_tokens, **extra)
            if round_index:
                runs[name].append(result)
    reference = runs[next(iter(modes))][0]["text"]
    summary = {}
    for name, results in runs.items():
        for result in results:
            if result["text"] != reference:
                raise SystemExit(f"mode {name!r} changed the reply: greedy output must not")
        summary[name] = {
            "seconds": statistics.median(r["seconds"] for r in results),
            "ttft_s": statistics.median(r["ttft_s"] for r in results),
            "completion_tokens": results[0]["completion_tokens"],
            "matched": results[0]["matched"],
            "drafted": results[0]["drafted"],
            "acceptance": results[0]["acceptance"],
            "reply": reference,
        }
        summary[name]["tokens_per_s"] = (
            summary[name]["completion_tokens"] / summary[name]["seconds"]
        )
    return summary


def report(workload: str, summary: dict[str, dict[str, Any]], baseline: str) -> None:
    base = summary[baseline]["seconds"]
    for name, row in summary.items():
        rates = row["acceptance"].split(",")[:4] if row["acceptance"] else []
        print(
            f"{workload:10s} {name:9s} {row['seconds']:7.2f} s  {row['tokens_per_s']:7.1f} tok/s  "
            f"{base / row['seconds']:5.2f}x  tokens {row['completion_tokens']:5d}  "
            f"drafted {row['drafted']:5d}  prediction matched {row['matched']:5d}  "
            f"acceptance by position {','.join(rates) or '-'}",
            flush=True,
        )


def code_edit(url: str, model: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    messages = edit_messages()
    plain = chat(url, model, messages, args.max_tokens)["text"]
    edited = EDITED_FILE.read_text().replace(*RENAME)
    modes = {
        "none": {},
        "edited": {"prediction": {"type": "content", "content": edited}},
        "exact": {"prediction": {"type": "content", "content": plain}},
        "wrong": {"prediction": {"type": "content", "content": OTHER_FILE.read_text()}},
    }
    summary = run_modes(url, model, messages, args.max_tokens, modes, args.repeats)
    report("code-edit", summary, "none")
    return summary


def quote(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The quote workload on a stack without prompt lookup, then on one with it."""
    summary = {}
    for label, launcher_args in (
        ("lookup-off", ()),
        ("lookup-on", ("--decode-args=--prompt-lookup",)),
    ):
        with launched_stack(args.model, args.port, *launcher_args) as url:
            model = served_model(url)
            modes = {label: {}}
            summary.update(
                run_modes(url, model, quote_messages(), args.max_tokens, modes, args.repeats)
            )
    if summary["lookup-on"]["reply"] != summary["lookup-off"]["reply"]:
        raise SystemExit("prompt lookup changed the reply: greedy output must not")
    report("quote", summary, "lookup-off")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--launch", action="store_true", help="start our stack for the run")
    parser.add_argument("--model", default="default", help="model for --launch")
    parser.add_argument("--port", type=int, default=8031, help="HTTP port for --launch")
    parser.add_argument("--max-tokens", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/speculation.json")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    with (
        launched_stack(args.model, args.port) if args.launch else contextlib.nullcontext(args.url)
    ) as url:
        results["code_edit"] = code_edit(url, served_model(url), args)
    if args.launch:
        results["quote"] = quote(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
