"""What GET /metrics exports: this frontend's request histograms and token counters, and the
stages' load, read from their Info at scrape time."""

from frontend.metrics.prometheus import Counter, Histogram, Labels, gauge
from frontend.metrics.request import RequestMetrics
from frontend.stages.types import STAGE_NAMES, StageStats

PREFIX = "llmserve_"
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


class ServerMetrics:
    def __init__(self) -> None:
        self.stage_duration = Histogram(
            PREFIX + "stage_duration_seconds",
            "Per-request time in each stage (Fireworks names), by stage.",
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Request arrival to its first token."
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens of a choice."
        )
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Request arrival to its last token."
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens_total", "Prompt tokens prefilled.")
        self.cached_prompt_tokens = Counter(
            PREFIX + "cached_prompt_tokens_total", "Prompt tokens served from the prefix cache."
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens_total", "Completion tokens generated."
        )
        self.requests = Counter(PREFIX + "requests_total", "Finished requests, by outcome.")
        self.draft_tokens = Counter(
            PREFIX + "speculation_draft_tokens_total",
            "Draft tokens verified, by source (prediction, prompt_lookup) and position in "
            "their step (1: a step's first draft).",
        )
        self.accepted_draft_tokens = Counter(
            PREFIX + "speculation_accepted_tokens_total",
            "Draft tokens accepted, by source and position; divided by the drafted ones, the "
            "acceptance rate by position.",
        )

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
            self.stage_duration.observe(ns / 1e9, stage=stage)
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
        """Once per started request, however it ended."""
        self.requests.inc(outcome="completed" if completed else "aborted")
        if metrics.generation_queue_ns:
            self.stage_duration.observe(metrics.generation_queue_ns / 1e9, stage="generation-queue")
            self.stage_duration.observe(metrics.kv_transfer_ns / 1e9, stage="kv-transfer")
        if completed and metrics.last_token_at_ns is not None:
            self.e2e_latency.observe((metrics.last_token_at_ns - metrics.arrival_ns) / 1e9)
        spec = metrics.speculation
        if spec is not None:
            source = "prediction" if spec.prediction_tokens else "prompt_lookup"
            for i, (drafted, accepted) in enumerate(
                zip(spec.drafted_by_position, spec.accepted_by_position, strict=True)
            ):
                self.draft_tokens.inc(drafted, source=source, position=str(i + 1))
                self.accepted_draft_tokens.inc(accepted, source=source, position=str(i + 1))

    def render(self, stats: list[StageStats], down: list[str], in_flight: int) -> str:
        lines: list[str] = []
        for metric in (
            self.stage_duration,
            self.time_to_first_token,
            self.inter_token_latency,
            self.e2e_latency,
        ):
            lines += metric.render()
        for counter in (
            self.prompt_tokens,
            self.cached_prompt_tokens,
            self.generation_tokens,
            self.requests,
            self.draft_tokens,
            self.accepted_draft_tokens,
        ):
            lines += counter.render()
        in_flight_sample: list[tuple[Labels, float]] = [((), in_flight)]
        lines += gauge(PREFIX + "requests_in_flight", "Requests being served.", in_flight_sample)
        lines += _stage_lines(stats, down)
        return "\n".join(lines) + "\n"


def _stage_lines(stats: list[StageStats], down: list[str]) -> list[str]:
    up = [((("stage", s),), 0.0 if s in down else 1.0) for s in STAGE_NAMES]
    lines = gauge(PREFIX + "stage_up", "Whether the stage answered Info on this scrape.", up)
    # The tokenizer holds no KV and runs no batch: only prefill and decode have load.
    loaded = [s for s in stats if s.service in ("prefill", "decode")]

    def samples(field: str) -> list[tuple[Labels, float]]:
        return [
            ((("instance", s.instance), ("service", s.service)), float(getattr(s, field)))
            for s in loaded
        ]

    for name, field, kind, help_text in _STAGE_GAUGES:
        lines += gauge(PREFIX + name, help_text, samples(field), kind)
    return lines


_STAGE_GAUGES = (
    (
        "prefix_cache_queried_blocks_total",
        "prefix_cache_queried_blocks",
        "counter",
        "Blocks looked up in the prefix cache.",
    ),
    (
        "prefix_cache_hit_blocks_total",
        "prefix_cache_hit_blocks",
        "counter",
        "Blocks found in the prefix cache.",
    ),
    (
        "instance_requests_total",
        "num_requests",
        "counter",
        "Requests served (prefill: prompts prefilled; decode: sequences admitted).",
    ),
    (
        "instance_tokens_total",
        "num_tokens",
        "counter",
        "Tokens produced (prefill: uncached prompt tokens computed; decode: tokens sampled).",
    ),
    ("steps_total", "num_steps", "counter", "Batched forward passes run."),
    ("step_seconds_total", "step_seconds", "counter", "Time spent in steps."),
    (
        "grammar_steps_total",
        "num_grammar_steps",
        "counter",
        "Decode steps with at least one grammar-constrained sequence.",
    ),
    (
        "grammar_seconds_total",
        "grammar_seconds",
        "counter",
        "Decode step time spent filling and applying grammar masks and advancing grammars.",
    ),
    ("kv_blocks_used", "num_used_blocks", "gauge", "KV blocks in use."),
    ("kv_blocks_free", "num_free_blocks", "gauge", "KV blocks free (cached ones included)."),
    ("running_requests", "num_running", "gauge", "Sequences running."),
    ("waiting_requests", "num_waiting", "gauge", "Sequences waiting."),
)
