"""Requests too large to serve get a clear 400 or 413 naming what is too large; a full stage or
a full frontend answers 429 with Retry-After before any token."""

import json
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from frontend.metrics.request import MAX_HEADER_BYTES, SAMPLING_OPTIONS_HEADER
from tests.test_frontend_fake_stages import MODEL_ID, FakeStages, fake_config

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def _error(response: Any) -> dict[str, Any]:
    return response.json()["error"]


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
        ({"stop": ["x" * 257]}, "stop", "256 characters"),
        ({"prompt": ["a"] * 16, "n": 9}, "n", "16 x 9"),
        (
            {"response_format": {"type": "json_object", "schema": {"description": "x" * 70000}}},
            "response_format",
            "64 KiB",
        ),
    ],
    ids=["logit_bias", "stop", "prompts_x_n", "schema"],
)
def test_oversized_fields_are_refused_by_name(
    fake_client: TestClient, extra: dict[str, Any], param: str, says: str
) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, **extra}
    response = fake_client.post(COMPLETIONS, json=body)
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == param and says in _error(response)["message"]


def test_too_many_tools_are_refused(fake_client: TestClient) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    tools = [json.loads(json.dumps(tool).replace('"f"', f'"f{i}"')) for i in range(129)]
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    response = fake_client.post(CHAT, json=body)
    assert response.status_code == 400 and _error(response)["param"] == "tools"


def test_a_body_over_8_mib_is_413(fake_client: TestClient) -> None:
    body = json.dumps({"model": MODEL_ID, "prompt": "x" * (8 * 1024 * 1024)})
    response = fake_client.post(
        COMPLETIONS, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"


def test_sampling_options_header_stays_small(fake_client: TestClient) -> None:
    body = {
        "model": MODEL_ID,
        "prompt": "hi",
        "max_tokens": 2,
        "logit_bias": {str(i): -1.5 for i in range(250)},
        "stop": ["\u00e9" * 256] * 4,
    }
    response = fake_client.post(COMPLETIONS, json=body)
    assert response.status_code == 200
    header = response.headers[SAMPLING_OPTIONS_HEADER]
    assert len(header) <= MAX_HEADER_BYTES
    options = json.loads(header)
    assert options["logit_bias"] == "250 entries" and options["stop"] == "4 sequences"


def test_a_full_stage_answers_429_with_retry_after(
    fake_client: TestClient, fakes: FakeStages
) -> None:
    fakes.prefill.full = True
    try:
        body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, "stream": True}
        response = fake_client.post(COMPLETIONS, json=body)
    finally:
        fakes.prefill.full = False
    assert response.status_code == 429 and int(response.headers["retry-after"]) > 0
    assert _error(response)["code"] == "overloaded" and "prefill" in _error(response)["message"]


def test_a_full_frontend_answers_429(fakes: FakeStages) -> None:
    with TestClient(create_app(fake_config(fakes, max_requests=0))) as client:
        response = client.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": "hi"})
    assert response.status_code == 429 and response.headers["retry-after"]


def test_a_request_past_its_time_limit_ends_with_504_and_frees_its_kv(fakes: FakeStages) -> None:
    fakes.decode.mode, fakes.decode.cancelled = "endless", threading.Event()
    try:
        with TestClient(create_app(fake_config(fakes, request_timeout_s=0.5))) as client:
            body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 10}
            response = client.post(COMPLETIONS, json=body)
            assert response.status_code == 504 and _error(response)["code"] == "request_timeout"
            # The decode call was cancelled: decode frees the request's KV.
            assert fakes.decode.cancelled.wait(5)
            stream = client.post(COMPLETIONS, json={**body, "stream": True})
            assert stream.status_code == 200 and '"code":"request_timeout"' in stream.text
    finally:
        fakes.decode.mode = "normal"
