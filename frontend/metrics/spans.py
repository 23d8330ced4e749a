"""Trace spans of the HTTP API, with --otlp-traces-endpoint (services.tracing).

FastAPI's own OpenTelemetry instrumentation serves a server span per request once a tracer
provider is set, continuing the client's W3C `traceparent`; the stage calls made while serving
it are its children, and its attributes carry the request's perf metrics (Fireworks names).
"""

from collections.abc import MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace

from frontend.metrics.request import RequestMetrics

# Probes and scrapes: a trace each would bury the requests.
UNTRACED_PATHS = ("/health", "/metrics")


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


# The request span alone (no span per dependency or serialization); Prometheus has the metrics.
TELEMETRY: TelemetryConfig = {
    "operation_spans": False,
    "metrics": False,
    "logs": False,
    "exclude": _untraced,
}


def add_perf_metrics(metrics: RequestMetrics) -> None:
    """The request's perf metrics as attributes of its span (the current one), under their
    perf_metrics names: numbers as numbers."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({name: _number(value) for name, value in metrics.as_dict().items()})


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
