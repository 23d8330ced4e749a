"""deploy/grafana's dashboard against what the real stack exports: every metric its panels'
PromQL reads is in GET /metrics after a few requests."""

import json
import pathlib
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "llmserve.json"
METRIC_NAME = re.compile(r"\bllmserve_\w+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
# What the dashboard promises to show, as a metric each.
SHOWN = (
    "llmserve_time_to_first_token_seconds",
    "llmserve_inter_token_latency_seconds",
    "llmserve_stage_duration_seconds",
    "llmserve_request_queue_time_seconds",
    "llmserve_prefix_cache_hits",
    "llmserve_kv_blocks_used",
    "llmserve_num_requests_running",
    "llmserve_num_requests_waiting",
    "llmserve_generation_tokens",
    "llmserve_request_errors",
)


def panel_exprs() -> dict[str, list[str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in panels}


def used_names() -> set[str]:
    exprs = [expr for panel in panel_exprs().values() for expr in panel]
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def family(name: str) -> str:
    """The family of a series name as prometheus_client's parser names it: a histogram's
    without `_bucket`/`_sum`/`_count`, a counter's without `_total`."""
    return HISTOGRAM_SUFFIX.sub("", name).removesuffix("_total")


def test_every_panel_queries_llmserve_metrics():
    for title, exprs in panel_exprs().items():
        assert exprs, title
        for expr in exprs:
            assert METRIC_NAME.search(expr), (title, expr)
    assert set(SHOWN) <= {family(name) for name in used_names()}


def test_every_metric_in_the_dashboard_is_exported(stack, model):
    url = stack.http_url
    completion = {"model": model, "prompt": "The capital of France is", "max_tokens": 4}
    assert httpx.post(f"{url}/v1/completions", json=completion, timeout=120).status_code == 200
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "stream": True,
    }
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).status_code == 200
    invalid = {**completion, "temperature": -1}
    assert httpx.post(f"{url}/v1/completions", json=invalid, timeout=60).status_code == 400

    text = httpx.get(f"{url}/metrics", timeout=30).text
    exported = {
        family.name: {sample.name for sample in family.samples}
        for family in text_string_to_metric_families(text)
    }
    series = set().union(*exported.values())
    for name in sorted(used_names()):
        assert family(name) in exported, name
        assert name in series, f"{name}: exported without samples"
