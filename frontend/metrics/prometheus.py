"""A minimal Prometheus text exposition (format 0.0.4): counters, histograms, gauges.

Everything runs on the event loop's thread, so no locks.
"""

import math
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]

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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Iterable[tuple[str, str]]) -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in labels]
    return "{" + ",".join(parts) + "}" if parts else ""


def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help_text = help_text
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self._values[key] = self._values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = header(self.name, "counter", self.help_text)
        for labels, value in sorted(self._values.items()):
            lines.append(f"{self.name}{format_labels(labels)} {format_value(value)}")
        return lines


class Histogram:
    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = DURATION_BUCKETS
    ) -> None:
        self.name = name
        self.help_text = help_text
        self.buckets = tuple(sorted(buckets))
        # labels -> (count per bucket, not cumulative; +Inf last), sum
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        counts[index] += 1
        total[0] += value

    def render(self) -> list[str]:
        lines = header(self.name, "histogram", self.help_text)
        for labels, (counts, total) in sorted(self._series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                bucket_labels = format_labels((*labels, ("le", format_value(bound))))
                lines.append(f"{self.name}_bucket{bucket_labels} {cumulative}")
            lines.append(f"{self.name}_sum{format_labels(labels)} {format_value(total[0])}")
            lines.append(f"{self.name}_count{format_labels(labels)} {cumulative}")
        return lines


def gauge(
    name: str, help_text: str, samples: Iterable[tuple[Labels, float]], kind: str = "gauge"
) -> list[str]:
    """A metric whose values are read at scrape time (kind "counter" for running totals)."""
    lines = header(name, kind, help_text)
    for labels, value in samples:
        lines.append(f"{name}{format_labels(labels)} {format_value(value)}")
    return lines
