"""Streams over the fake stages: the Responses API's stream_options."""

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.test_frontend_fake_stages import MODEL_ID

RESPONSES = "/v1/responses"


@pytest.mark.parametrize(
    "options", [{}, {"include_obfuscation": False}, {"include_usage": True}, None]
)
def test_responses_accept_stream_options_that_ask_for_nothing_missing(
    fake_client: TestClient, options: dict[str, Any] | None
) -> None:
    body = {"model": MODEL_ID, "input": "hi", "max_output_tokens": 2, "stream": True}
    response = fake_client.post(RESPONSES, json={**body, "stream_options": options})
    assert response.status_code == 200, response.text
    assert "event: response.incomplete" in response.text


@pytest.mark.parametrize("name", ["include_obfuscation", "continuous_usage_stats"])
def test_responses_refuse_stream_options_they_lack(fake_client: TestClient, name: str) -> None:
    body = {"model": MODEL_ID, "input": "hi", "stream": True, "stream_options": {name: True}}
    response = fake_client.post(RESPONSES, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == f"stream_options.{name}"
