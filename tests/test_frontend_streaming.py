"""Streams over the fake stages: usage on every chunk (stream_options.continuous_usage_stats)
and the Responses API's stream_options."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.test_frontend_fake_stages import MODEL_ID

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
USER = [{"role": "user", "content": "hi"}]
COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _events(text: str) -> list[dict[str, Any]]:
    frames = [f for f in text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]


def test_continuous_usage_stats_put_the_counts_so_far_on_every_chunk(
    fake_client: TestClient,
) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 3, "stream": True}
    response = fake_client.post(COMPLETIONS, json={**body, "stream_options": options})
    *chunks, usage_only = _events(response.text)
    # "hello" is 6 tokens with BOS; decode sends a, b, c, the last with the finish reason.
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", "c", ""]
    assert [c["usage"] for c in chunks] == [
        {"prompt_tokens": 6, "completion_tokens": n, "total_tokens": 6 + n} for n in (1, 2, 3, 3)
    ]
    # The usage chunk is still the last, alone and whole.
    assert usage_only["choices"] == []
    assert usage_only["usage"] == {
        **chunks[-1]["usage"],
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_continuous_usage_stats_in_chat_without_include_usage(fake_client: TestClient) -> None:
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 2, "n": 2, "stream": True}
    options = {"continuous_usage_stats": True}
    events = _events(fake_client.post(CHAT, json={**body, "stream_options": options}).text)
    assert all(set(COUNTS) <= set(e["usage"]) for e in events)
    completion_tokens = [e["usage"]["completion_tokens"] for e in events]
    assert completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 4
    # Without include_usage the last finish chunk carries the whole usage, as before.
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


def test_without_continuous_usage_stats_only_the_last_chunk_has_usage(
    fake_client: TestClient,
) -> None:
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 2, "stream": True}
    options = {"include_usage": True, "continuous_usage_stats": False}
    events = _events(fake_client.post(CHAT, json={**body, "stream_options": options}).text)
    assert [e["usage"] is not None for e in events if "usage" in e] == [True]
    assert "usage" in events[-1] and events[-1]["choices"] == []


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
