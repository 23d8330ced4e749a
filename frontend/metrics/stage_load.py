"""The stages' load on GET /metrics: each prefill and decode instance's Info, polled at scrape
time, yielded as metric families by a custom prometheus_client collector."""

from collections.abc import Callable, Iterator
from operator import attrgetter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from frontend.stages.types import STAGE_NAMES, StageStats

PREFIX = "llmserve_"
INSTANCE_LABELS = ("instance", "service")
# The tokenizer holds no KV and runs no batch: only prefill and decode have load.
LOADED_SERVICES = ("prefill", "decode")


def kv_cache_usage(stats: StageStats) -> float:
    total = stats.num_used_blocks + stats.num_free_blocks
    return stats.num_used_blocks / total if total else 0.0


Family = type[CounterMetricFamily] | type[GaugeMetricFamily]
_COUNTER, _GAUGE = CounterMetricFamily, GaugeMetricFamily
# name, kind, help, value: one family per row, one sample per prefill and decode instance.
_FAMILIES: tuple[tuple[str, Family, str, Callable[[StageStats], float]], ...] = (
    (
        "prefix_cache_queried_blocks_total",
        _COUNTER,
        "Blocks looked up in the prefix cache.",
        attrgetter("prefix_cache_queried_blocks"),
    ),
    (
        "prefix_cache_hit_blocks_total",
        _COUNTER,
        "Blocks found in the prefix cache.",
        attrgetter("prefix_cache_hit_blocks"),
    ),
    (
        "instance_requests_total",
        _COUNTER,
        "Requests served (prefill: prompts prefilled; decode: sequences admitted).",
        attrgetter("num_requests"),
    ),
    (
        "instance_tokens_total",
        _COUNTER,
        "Tokens produced (prefill: uncached prompt tokens computed; decode: tokens sampled).",
        attrgetter("num_tokens"),
    ),
    ("steps_total", _COUNTER, "Batched forward passes run.", attrgetter("num_steps")),
    ("step_seconds_total", _COUNTER, "Time spent in steps.", attrgetter("step_seconds")),
    (
        "grammar_steps_total",
        _COUNTER,
        "Decode steps with at least one grammar-constrained sequence.",
        attrgetter("num_grammar_steps"),
    ),
    (
        "grammar_seconds_total",
        _COUNTER,
        "Decode step time spent filling and applying grammar masks and advancing grammars.",
        attrgetter("grammar_seconds"),
    ),
    ("kv_blocks_used", _GAUGE, "KV blocks in use.", attrgetter("num_used_blocks")),
    (
        "kv_blocks_free",
        _GAUGE,
        "KV blocks free (cached ones included).",
        attrgetter("num_free_blocks"),
    ),
    (
        "kv_cache_usage_perc",
        _GAUGE,
        "Share of the KV pool's blocks in use, 0 to 1 (vLLM's kv_cache_usage_perc).",
        kv_cache_usage,
    ),
    (
        "kv_cache_bytes",
        _GAUGE,
        "Bytes of the KV pool (its capacity; CPU pages take memory once first written).",
        attrgetter("kv_cache_bytes"),
    ),
    ("weight_bytes", _GAUGE, "Bytes of the model's weights as held.", attrgetter("weight_bytes")),
    ("running_requests", _GAUGE, "Sequences running.", attrgetter("num_running")),
    ("waiting_requests", _GAUGE, "Sequences waiting.", attrgetter("num_waiting")),
    (
        "num_requests_running",
        _GAUGE,
        "Sequences running (vLLM's num_requests_running; also as running_requests).",
        attrgetter("num_running"),
    ),
    (
        "num_requests_waiting",
        _GAUGE,
        "Sequences waiting (vLLM's num_requests_waiting; also as waiting_requests).",
        attrgetter("num_waiting"),
    ),
)


class StageCollector(Collector):
    """Yields the stages' load as last polled: `update` it right before each scrape."""

    def __init__(self) -> None:
        self._stats: list[StageStats] = []
        self._down: list[str] = list(STAGE_NAMES)

    def update(self, stats: list[StageStats], down: list[str]) -> None:
        """Each answering instance's stats, and the stages none of whose instances answered."""
        self._stats, self._down = stats, down

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            PREFIX + "stage_up", "Whether the stage answered Info on this scrape.", labels=["stage"]
        )
        for stage in STAGE_NAMES:
            up.add_metric([stage], 0.0 if stage in self._down else 1.0)
        yield up
        loaded = [s for s in self._stats if s.service in LOADED_SERVICES]
        for name, kind, help_text, value in _FAMILIES:
            family = kind(PREFIX + name, help_text, labels=INSTANCE_LABELS)
            for stats in loaded:
                family.add_metric([stats.instance, stats.service], value(stats))
            yield family
