"""Per-request stage timings under their Fireworks names.

Stage-internal durations come from the stages' `*_ns` fields; the frontend's own clock
(time.monotonic_ns) only measures spans inside this process, never against a stage's clock.
"""

from dataclasses import dataclass

HEADER_PREFIX = "fireworks-"


def seconds(ns: int) -> str:
    return f"{ns / 1e9:.6f}"


@dataclass(slots=True)
class RequestMetrics:
    arrival_ns: int
    num_concurrent_requests: int = 0
    prompt_tokens: int = 0
    # No stage reports prefix-cache hits yet.
    cached_prompt_tokens: int = 0
    tokenizer_queue_ns: int = 0
    tokenizer_ns: int = 0
    prefill_queue_ns: int = 0
    prefill_ns: int = 0
    generation_queue_ns: int = 0
    kv_transfer_ns: int = 0
    first_token_at_ns: int | None = None
    last_token_at_ns: int | None = None
    backend_host: str = ""

    def as_dict(self) -> dict[str, str]:
        """The perf_metrics body field; the headers carry the same values."""
        metrics = {
            "prompt-tokens": str(self.prompt_tokens),
            "cached-prompt-tokens": str(self.cached_prompt_tokens),
            "tokenizer-queue-duration": seconds(self.tokenizer_queue_ns),
            "tokenizer-duration": seconds(self.tokenizer_ns),
            "prefill-queue-duration": seconds(self.prefill_queue_ns),
            "prefill-duration": seconds(self.prefill_ns),
            "generation-queue-duration": seconds(self.generation_queue_ns),
            "kv-transfer-duration": seconds(self.kv_transfer_ns),
            "num-concurrent-requests": str(self.num_concurrent_requests),
            "backend-host": self.backend_host,
        }
        if self.first_token_at_ns is not None:
            metrics["server-time-to-first-token"] = seconds(
                self.first_token_at_ns - self.arrival_ns
            )
        if self.last_token_at_ns is not None:
            metrics["server-processing-time"] = seconds(self.last_token_at_ns - self.arrival_ns)
        return metrics

    def headers(self) -> dict[str, str]:
        return {HEADER_PREFIX + name: value for name, value in self.as_dict().items()}


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
