"""Per-request stage timings under their Fireworks names.

Stage-internal durations come from the stages' `*_ns` fields; the frontend's own clock
(time.monotonic_ns) only measures spans inside this process, never against a stage's clock.

The spans before the first token tile the interval from arrival to the first token:

    tokenizer-queue + tokenizer + tokenizer-rpc-overhead
      + prefill-queue + prefill + prefill-rpc-overhead + frontend = server-time-to-first-token

where a `*-rpc-overhead` term is a stage call's wall time (taken here, around the RPC) less
what the stage reports as its queue and work: network, (de)serialization and the stage's own
scheduling around the work. `frontend` is the rest: this process's own work between the calls
(validation, limits, max_tokens fitting, scheduling). The first token is ready when prefill
returns it, since decode streams prefill's token first. generation-queue and kv-transfer
come after it. When decode computes the prompt itself (`--local-prefill-tokens`), the
prefill terms are its Generate call's: queue before the step that began the prompt, compute
from there to the first token, and the rest of the call's wall time to the first message as
overhead; generation-queue and kv-transfer are then zero.
"""

import json
from dataclasses import dataclass
from typing import Any

from frontend.stages.types import SpeculationStats

HEADER_PREFIX = "fireworks-"
SAMPLING_OPTIONS_HEADER = "fireworks-sampling-options"
MAX_HEADER_BYTES = 4096  # the sampling-options header stays under what proxies accept


def seconds(ns: int) -> str:
    return f"{ns / 1e9:.6f}"


@dataclass(slots=True)
class PathTimings:
    """One prompt's way to its first token: its stage calls, split as the stages report."""

    tokenizer_queue_ns: int = 0
    tokenizer_ns: int = 0
    tokenizer_overhead_ns: int = 0
    prefill_queue_ns: int = 0
    prefill_ns: int = 0
    prefill_overhead_ns: int = 0

    def add_tokenizer_call(self, wall_ns: int, queue_ns: int, work_ns: int) -> None:
        self.tokenizer_queue_ns += queue_ns
        self.tokenizer_ns += work_ns
        self.tokenizer_overhead_ns += wall_ns - queue_ns - work_ns

    def add_prefill_call(self, wall_ns: int, queue_ns: int, work_ns: int) -> None:
        self.prefill_queue_ns += queue_ns
        self.prefill_ns += work_ns
        self.prefill_overhead_ns += wall_ns - queue_ns - work_ns

    def stage_ns(self) -> int:
        return (
            self.tokenizer_queue_ns
            + self.tokenizer_ns
            + self.tokenizer_overhead_ns
            + self.prefill_queue_ns
            + self.prefill_ns
            + self.prefill_overhead_ns
        )


@dataclass(slots=True)
class RequestMetrics:
    arrival_ns: int
    num_concurrent_requests: int = 0
    prompt_tokens: int = 0  # over all prompts
    cached_prompt_tokens: int = 0  # over all prompts, their first choice's prefill
    # The path (prompt) that produced the first token.
    path: PathTimings | None = None
    generation_queue_ns: int = 0
    kv_transfer_ns: int = 0
    first_token_at_ns: int | None = None
    last_token_at_ns: int | None = None
    backend_host: str = ""
    # Speculative decoding, over all choices: set when a prediction was given or drafts
    # were verified.
    speculation: SpeculationStats | None = None

    def add_speculation(self, stats: SpeculationStats) -> None:
        if self.speculation is None:
            self.speculation = SpeculationStats()
        self.speculation.add(stats)

    def first_token(self, path: PathTimings, now_ns: int) -> None:
        """A prompt's first choice got its first token; the earliest one counts."""
        if self.first_token_at_ns is None:
            self.first_token_at_ns = now_ns
            self.path = path

    def frontend_ns(self) -> int:
        assert self.first_token_at_ns is not None and self.path is not None
        return self.first_token_at_ns - self.arrival_ns - self.path.stage_ns()

    def as_dict(self) -> dict[str, str]:
        """The perf_metrics body field; the headers carry the same values."""
        path = self.path or PathTimings()
        metrics = {
            "prompt-tokens": str(self.prompt_tokens),
            "cached-prompt-tokens": str(self.cached_prompt_tokens),
            "tokenizer-queue-duration": seconds(path.tokenizer_queue_ns),
            "tokenizer-duration": seconds(path.tokenizer_ns),
            "tokenizer-rpc-overhead-duration": seconds(path.tokenizer_overhead_ns),
            "prefill-queue-duration": seconds(path.prefill_queue_ns),
            "prefill-duration": seconds(path.prefill_ns),
            "prefill-rpc-overhead-duration": seconds(path.prefill_overhead_ns),
            "generation-queue-duration": seconds(self.generation_queue_ns),
            "kv-transfer-duration": seconds(self.kv_transfer_ns),
            "num-concurrent-requests": str(self.num_concurrent_requests),
            "backend-host": self.backend_host,
        }
        if self.first_token_at_ns is not None:
            metrics["frontend-duration"] = seconds(self.frontend_ns())
            metrics["server-time-to-first-token"] = seconds(
                self.first_token_at_ns - self.arrival_ns
            )
        if self.last_token_at_ns is not None:
            metrics["server-processing-time"] = seconds(self.last_token_at_ns - self.arrival_ns)
        if self.speculation is not None:
            spec = self.speculation
            metrics["speculation-prompt-tokens"] = str(spec.prediction_tokens)
            matched = spec.accepted_tokens if spec.prediction_tokens else 0
            metrics["speculation-prompt-matched-tokens"] = str(matched)
            metrics["speculation-generated-tokens"] = str(spec.draft_tokens)
            metrics["speculation-acceptance"] = ",".join(f"{r:.4f}" for r in spec.acceptance())
        return metrics

    def headers(self) -> dict[str, str]:
        return {HEADER_PREFIX + name: value for name, value in self.as_dict().items()}


def sampling_options_header(options: dict[str, Any]) -> dict[str, str]:
    # ASCII JSON: header values must be latin-1, and stop strings may be anything.
    value = json.dumps(options, separators=(",", ":"))
    if len(value) > MAX_HEADER_BYTES:
        # Proxies and clients break on long headers: the long fields' sizes stand in for them.
        options = {
            **options,
            "logit_bias": f"{len(options['logit_bias'])} entries",
            "stop": f"{len(options['stop'])} sequences",
        }
        value = json.dumps(options, separators=(",", ":"))
    return {SAMPLING_OPTIONS_HEADER: value}


class InFlight:
    """Counts requests between arrival and their last byte (or their failure)."""

    def __init__(self) -> None:
        self.count = 0

    def enter(self) -> int:
        """Registers a request; returns how many were already in flight."""
        self.count += 1
        return self.count - 1

    def leave(self) -> None:
        self.count -= 1
