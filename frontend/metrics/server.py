"""What GET /metrics exports: this frontend's request histograms and counters, and the stages'
load, read from their Info at scrape time (frontend.metrics.stage_load).

Each app has its own CollectorRegistry, so that several apps can live in one process (tests).
Where vLLM exports the same quantity, the name parallels its own under our prefix
(`llmserve_num_requests_running` for `vllm:num_requests_running`).
"""

import functools

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from frontend.errors import ApiError
from frontend.metrics.request import InFlight, RequestMetrics
from frontend.metrics.stage_load import StageCollector
from frontend.stages.types import StageStats

NAMESPACE = "llmserve"
# The Fireworks stage names, as label values of the stage histogram.
STAGES = (
    "tokenizer-queue",
    "tokenizer",
    "tokenizer-rpc-overhead",
    "prefill-queue",
    "prefill",
    "prefill-rpc-overhead",
    "frontend",
    "generation-queue",
    "kv-transfer",
)
# Seconds, from sub-millisecond stage queues to multi-minute generations.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# How a generation request (completions, chat, responses) ended: answered in full, its client
# gone first, or answered with an error (a status, or an SSE error event).
OUTCOMES = ("completed", "aborted", "error")
# The errors every deployment sees sooner or later, exported at 0 from the start so that
# rates over them exist before the first one.
KNOWN_ERRORS = (
    ("400", "invalid_value"),
    ("400", "context_length_exceeded"),
    ("429", "overloaded"),
    ("500", "internal_error"),
    ("503", "stage_unavailable"),
    ("504", "request_timeout"),
)
DRAFT_SOURCES = ("prediction", "prompt_lookup")

# No `*_created` series: they would double what Prometheus stores, and nothing reads them.
disable_created_metrics()


def error_kind(error: ApiError) -> str:
    """The error body's `code`, or its `type` for errors without one."""
    return error.code or error.type


class ServerMetrics:
    def __init__(self, in_flight: InFlight) -> None:
        self.registry = CollectorRegistry()
        self.stages = StageCollector()
        self.registry.register(self.stages)
        histogram = functools.partial(
            Histogram, namespace=NAMESPACE, buckets=DURATION_BUCKETS, registry=self.registry
        )
        counter = functools.partial(Counter, namespace=NAMESPACE, registry=self.registry)
        self.stage_duration = histogram(
            "stage_duration_seconds",
            "Per-request time in each stage (Fireworks names), by stage.",
            ["stage"],
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Request arrival to its first token."
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of a choice."
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Request arrival to its last token."
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "Time the request's prompt waited in prefill before its first chunk ran "
            "(prefill-queue-duration).",
        )
        self.request_prefill_time = histogram(
            "request_prefill_time_seconds",
            "Prefill compute of the request's prompt, all chunks (prefill-duration).",
        )
        self.request_decode_time = histogram(
            "request_decode_time_seconds", "First token to last token of a completed request."
        )
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens prefilled.")
        self.cached_prompt_tokens = counter(
            "cached_prompt_tokens_total", "Prompt tokens served from the prefix cache."
        )
        self.prefix_cache_queries = counter(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in prefill's prefix cache, every choice's prefill call.",
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits_total",
            "Prompt tokens found in prefill's prefix cache; over the queries, the hit rate.",
        )
        self.generation_tokens = counter("generation_tokens_total", "Completion tokens generated.")
        self.requests = counter(
            "requests_total",
            "Generation requests, by outcome: completed, aborted (the client left, queued or "
            "mid-stream) or error (answered with an error, or ended by an SSE error event).",
            ["outcome"],
        )
        self.errors = counter(
            "request_errors_total",
            "Requests answered with an error (or ended by an SSE error event), by HTTP status "
            "and kind (the error's code, else its type).",
            ["status", "kind"],
        )
        self.draft_tokens = counter(
            "speculation_draft_tokens_total",
            "Draft tokens verified, by source (prediction, prompt_lookup) and position in "
            "their step (1: a step's first draft).",
            ["position", "source"],
        )
        self.accepted_draft_tokens = counter(
            "speculation_accepted_tokens_total",
            "Draft tokens accepted, by source and position; divided by the drafted ones, the "
            "acceptance rate by position.",
            ["position", "source"],
        )
        self._start_at_zero()
        in_flight_gauge = Gauge(
            "requests_in_flight",
            "Requests being served.",
            namespace=NAMESPACE,
            registry=self.registry,
        )
        in_flight_gauge.set_function(lambda: in_flight.count)

    def _start_at_zero(self) -> None:
        """Every labelled series with known label values exists from the start: a series
        that appears only when first counted breaks rate() and sums over it until then."""
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for status, kind in KNOWN_ERRORS:
            self.errors.labels(status, kind)
        for source in DRAFT_SOURCES:
            self.draft_tokens.labels("1", source)
            self.accepted_draft_tokens.labels("1", source)

    def observe_outcome(self, outcome: str) -> None:
        """Once per generation request, however it ended (one of OUTCOMES)."""
        self.requests.labels(outcome).inc()

    def observe_prefill(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """One prefill call (any choice) and what of its prompt the prefix cache served."""
        self.prefix_cache_queries.inc(num_prompt_tokens)
        self.prefix_cache_hits.inc(num_cached_tokens)

    def observe_first_token(self, metrics: RequestMetrics) -> None:
        assert metrics.first_token_at_ns is not None and metrics.path is not None
        path = metrics.path
        spans = (
            path.tokenizer_queue_ns,
            path.tokenizer_ns,
            path.tokenizer_overhead_ns,
            path.prefill_queue_ns,
            path.prefill_ns,
            path.prefill_overhead_ns,
            metrics.frontend_ns(),
        )
        for stage, ns in zip(STAGES, spans, strict=False):
            self.stage_duration.labels(stage).observe(ns / 1e9)
        self.request_queue_time.observe(path.prefill_queue_ns / 1e9)
        self.request_prefill_time.observe(path.prefill_ns / 1e9)
        ttft_ns = metrics.first_token_at_ns - metrics.arrival_ns
        self.time_to_first_token.observe(ttft_ns / 1e9)
        self.prompt_tokens.inc(metrics.prompt_tokens)
        self.cached_prompt_tokens.inc(metrics.cached_prompt_tokens)

    def observe_tokens(self, num_tokens: int, gap_ns: int | None) -> None:
        """A decode message of `num_tokens`, `gap_ns` after the previous one of its choice."""
        self.generation_tokens.inc(num_tokens)
        if gap_ns is not None and num_tokens > 0:
            per_token = gap_ns / num_tokens / 1e9
            for _ in range(num_tokens):
                self.inter_token_latency.observe(per_token)

    def observe_end(self, metrics: RequestMetrics, completed: bool) -> None:
        """Once per started request, however it ended (its outcome is counted apart)."""
        if metrics.generation_queue_ns:
            self.stage_duration.labels("generation-queue").observe(
                metrics.generation_queue_ns / 1e9
            )
            self.stage_duration.labels("kv-transfer").observe(metrics.kv_transfer_ns / 1e9)
        last, first = metrics.last_token_at_ns, metrics.first_token_at_ns
        if completed and last is not None and first is not None:
            self.e2e_latency.observe((last - metrics.arrival_ns) / 1e9)
            self.request_decode_time.observe((last - first) / 1e9)
        spec = metrics.speculation
        if spec is not None:
            source = "prediction" if spec.prediction_tokens else "prompt_lookup"
            for i, (drafted, accepted) in enumerate(
                zip(spec.drafted_by_position, spec.accepted_by_position, strict=True)
            ):
                self.draft_tokens.labels(str(i + 1), source).inc(drafted)
                self.accepted_draft_tokens.labels(str(i + 1), source).inc(accepted)

    def observe_error(self, error: ApiError) -> None:
        self.errors.labels(str(error.status), error_kind(error)).inc()

    def exposition(
        self, stats: list[StageStats], down: list[str], accept: str | None
    ) -> tuple[bytes, str]:
        """Every metric, with the stages' load as just polled, encoded as the scraper's Accept
        header asks (Prometheus text by default, or OpenMetrics); and its content type."""
        self.stages.update(stats, down)
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
