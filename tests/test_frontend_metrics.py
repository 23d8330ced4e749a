"""Per-request metrics (headers, perf_metrics, the TTFT breakdown), the sampling-options header
and GET /metrics, against the fake stages."""

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from frontend.context import AppState
from frontend.metrics.server import KNOWN_ERRORS, OUTCOMES, STAGES
from tests.sse import sse_events
from tests.test_frontend_disconnect import asgi_call
from tests.test_frontend_fake_stages import MODEL_ID, FakeStages, fake_config

COMPLETIONS = "/v1/completions"
# The terms that tile arrival -> first token (see frontend.metrics.request).
TTFT_TERMS = (
    "tokenizer-queue-duration",
    "tokenizer-duration",
    "tokenizer-rpc-overhead-duration",
    "prefill-queue-duration",
    "prefill-duration",
    "prefill-rpc-overhead-duration",
    "frontend-duration",
)
TOLERANCE_S = 0.005


@pytest.fixture
def slow_stages(fakes: FakeStages) -> Iterator[None]:
    fakes.tokenizer.delay_s = 0.02
    fakes.prefill.delay_s = 0.03
    yield
    fakes.tokenizer.delay_s = fakes.prefill.delay_s = 0.0


def assert_ttft_adds_up(metrics: dict[str, str]) -> None:
    terms = {name: float(metrics[name]) for name in TTFT_TERMS}
    assert all(value >= 0 for value in terms.values()), terms
    ttft = float(metrics["server-time-to-first-token"])
    assert abs(sum(terms.values()) - ttft) <= TOLERANCE_S, (terms, ttft)
    # What the fakes report, half queue and half work of their delay.
    assert float(metrics["tokenizer-queue-duration"]) == pytest.approx(0.01, abs=1e-6)
    assert float(metrics["prefill-duration"]) == pytest.approx(0.015, abs=1e-6)
    assert ttft <= float(metrics["server-processing-time"])


@pytest.mark.usefixtures("slow_stages")
def test_ttft_is_the_sum_of_its_stages(fake_client: TestClient) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 3, "perf_metrics_in_response": True}
    response = fake_client.post(COMPLETIONS, json=body)
    headers = {
        k.removeprefix("fireworks-"): v
        for k, v in response.headers.items()
        if k.startswith("fireworks-")
    }
    assert_ttft_adds_up(headers)
    assert response.json()["perf_metrics"] == {
        k: v for k, v in headers.items() if k != "sampling-options"
    }


@pytest.mark.usefixtures("slow_stages")
def test_ttft_sum_in_stream_and_for_chat_and_n(fake_client: TestClient) -> None:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2,
        "max_tokens": 2,
        "stream": True,
        "perf_metrics_in_response": True,
    }
    response = fake_client.post("/v1/chat/completions", json=body)
    final = sse_events(response.text)[-1]
    assert_ttft_adds_up(final["perf_metrics"])


def test_sampling_options_header(fake_client: TestClient) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "top_k": 5, "logit_bias": {"7": 1}, "stop": "x"}
    response = fake_client.post(COMPLETIONS, json=body)
    options = json.loads(response.headers["fireworks-sampling-options"])
    assert options == {
        "max_tokens": 16,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 5,
        "seed": None,
        "min_p": 0.0,
        "typical_p": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "repetition_penalty": 1.0,
        "mirostat_target": None,
        "mirostat_lr": 0.1,
        "logit_bias": {"7": 1.0},
        "logprobs": False,
        "top_logprobs": 0,
        "n": 1,
        "stop": ["x"],
        "ignore_eos": False,
        "include_stop_str_in_output": False,
    }
    stream = fake_client.post(COMPLETIONS, json={**body, "stream": True, "max_tokens": 1000})
    assert json.loads(stream.headers["fireworks-sampling-options"])["max_tokens"] == 64 - 3


def test_every_sampling_field_reaches_the_stages(
    fake_client: TestClient, fakes: FakeStages
) -> None:
    fields: dict[str, Any] = {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "typical_p": 0.8,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.25,
        "mirostat_target": 3.0,
        "mirostat_lr": 0.25,
        "seed": 11,
        "logprobs": True,
        "top_logprobs": 4,
    }
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, **fields}
    assert fake_client.post(COMPLETIONS, json=body).status_code == 200
    sampling = fakes.prefill.requests[-1].sampling
    for name, value in fields.items():
        assert getattr(sampling, name) == pytest.approx(value), name
    assert fakes.decode.requests[-1].sampling == sampling
    # Mirostat's state after prefill's token goes on to decode.
    assert fakes.decode.requests[-1].mirostat_mu == 5.5
    fake_client.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": "hi", "top_p": 0})
    assert not fakes.decode.requests[-1].HasField("mirostat_mu")
    # The API's top_p 0 (the most likely token only) arrives as a set 0, not as unset (off).
    sent = fakes.prefill.requests[-1].sampling
    assert sent.HasField("top_p") and sent.top_p == 0


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_prometheus_metrics(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 4}
    before = _samples(fake_client.get("/metrics").text)
    assert fake_client.post(COMPLETIONS, json=body).status_code == 200
    response = fake_client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert re.search(r"^# TYPE llmserve_time_to_first_token_seconds histogram$", text, re.M)
    after = _samples(text)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("llmserve_prompt_tokens_total") == 3
    assert grew("llmserve_generation_tokens_total") == 4
    assert grew("llmserve_time_to_first_token_seconds_count") == 1
    assert grew("llmserve_e2e_request_latency_seconds_count") == 1
    assert grew("llmserve_inter_token_latency_seconds_count") == 3
    for stage in ("tokenizer-queue", "prefill", "frontend", "generation-queue"):
        assert grew(f'llmserve_stage_duration_seconds_count{{stage="{stage}"}}') == 1
    assert after['llmserve_requests_total{outcome="completed"}'] >= 1
    # Polled from the stages' Info at scrape time.
    prefill = f'instance="{fakes.addresses["prefill"]}",service="prefill"'
    decode = f'instance="{fakes.addresses["decode"]}",service="decode"'
    assert after[f"llmserve_prefix_cache_queried_blocks_total{{{prefill}}}"] == 40
    assert after[f"llmserve_prefix_cache_hit_blocks_total{{{prefill}}}"] == 30
    assert after[f"llmserve_kv_blocks_used{{{prefill}}}"] == 3
    assert after[f"llmserve_kv_blocks_free{{{decode}}}"] == 11
    assert after[f"llmserve_running_requests{{{decode}}}"] == 2
    assert after[f"llmserve_waiting_requests{{{decode}}}"] == 1
    assert after['llmserve_stage_up{stage="tokenizer"}'] == 1
    assert after["llmserve_requests_in_flight"] == 0
    e2e = "llmserve_e2e_request_latency_seconds"
    buckets = [v for k, v in after.items() if k.startswith(e2e + "_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == after[e2e + "_count"]


def test_vllm_parallel_metrics_and_errors(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 4}
    before = _samples(fake_client.get("/metrics").text)
    assert fake_client.post(COMPLETIONS, json=body).status_code == 200
    assert fake_client.post(COMPLETIONS, json={**body, "temperature": -1}).status_code == 400
    after = _samples(fake_client.get("/metrics").text)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    # What the fakes report: a 3-token prompt, 2 of its tokens cached.
    assert grew("llmserve_prefix_cache_queries_total") == 3
    assert grew("llmserve_prefix_cache_hits_total") == 2
    for name in ("queue", "prefill", "decode"):
        assert grew(f"llmserve_request_{name}_time_seconds_count") == 1, name
    assert after["llmserve_request_prefill_time_seconds_sum"] > 0
    assert grew('llmserve_request_errors_total{kind="invalid_value",status="400"}') == 1
    decode = f'instance="{fakes.addresses["decode"]}",service="decode"'
    assert after[f"llmserve_num_requests_running{{{decode}}}"] == 2
    assert after[f"llmserve_num_requests_waiting{{{decode}}}"] == 1
    assert after[f"llmserve_kv_cache_usage_perc{{{decode}}}"] == 5 / 16


def test_openmetrics_when_asked(fake_client: TestClient) -> None:
    accept = "application/openmetrics-text; version=1.0.0"
    response = fake_client.get("/metrics", headers={"accept": accept})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_every_known_series_exists_from_the_start(fakes: FakeStages) -> None:
    with TestClient(create_app(fake_config(fakes))) as client:
        samples = _samples(client.get("/metrics").text)
    for outcome in OUTCOMES:
        assert samples[f'llmserve_requests_total{{outcome="{outcome}"}}'] == 0
    for stage in STAGES:
        assert samples[f'llmserve_stage_duration_seconds_count{{stage="{stage}"}}'] == 0
    for status, kind in KNOWN_ERRORS:
        assert samples[f'llmserve_request_errors_total{{kind="{kind}",status="{status}"}}'] == 0
    assert samples["llmserve_generation_tokens_total"] == 0


def test_requests_total_counts_requests_that_fail_before_generating(
    fake_client: TestClient, fakes: FakeStages
) -> None:
    before = _samples(fake_client.get("/metrics").text)
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
    assert fake_client.post(COMPLETIONS, json={**body, "temperature": -1}).status_code == 400
    assert fake_client.post(COMPLETIONS, json={**body, "model": "other"}).status_code == 404
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "n": 0}
    assert fake_client.post("/v1/chat/completions", json=chat).status_code == 400
    responses = {"model": MODEL_ID, "input": "hi", "max_output_tokens": 2, "stream": True}
    fakes.prefill.full = True
    try:
        assert fake_client.post(COMPLETIONS, json=body).status_code == 429
        assert fake_client.post("/v1/responses", json=responses).status_code == 429
    finally:
        fakes.prefill.full = False
    assert fake_client.post("/v1/responses", json=responses).status_code == 200
    after = _samples(fake_client.get("/metrics").text)

    def grew(outcome: str) -> float:
        name = f'llmserve_requests_total{{outcome="{outcome}"}}'
        return after[name] - before.get(name, 0.0)

    assert (grew("error"), grew("completed"), grew("aborted")) == (5, 1, 0)


def test_a_client_gone_while_queued_is_an_aborted_request(fakes: FakeStages) -> None:
    fakes.prefill.delay_s = 0.5

    async def leave_while_queued() -> tuple[list[dict[str, Any]], AppState]:
        app = create_app(fake_config(fakes))
        leave = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, leave.set)
        body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
        try:
            return await asgi_call(app, COMPLETIONS, body, leave), app.state.frontend
        finally:
            await app.state.frontend.stages.close()

    try:
        messages, state = asyncio.run(leave_while_queued())
    finally:
        fakes.prefill.delay_s = 0.0
    assert messages[0]["status"] == 499
    aborted = {"outcome": "aborted"}
    assert state.server_metrics.registry.get_sample_value("llmserve_requests_total", aborted) == 1
