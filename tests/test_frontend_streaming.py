"""Streams over the fake stages: usage on every chunk (stream_options.continuous_usage_stats),
the status line and keep-alive comments while a request waits for its first token, failures
after the status line as error events, and the Responses API's stream_options."""

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from frontend.context import AppState
from frontend.output.sse_response import KEEP_ALIVE
from tests.sse import sse_events
from tests.test_frontend_disconnect import asgi_call
from tests.test_frontend_fake_stages import MODEL_ID, FakeStages, fake_config

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
USER = [{"role": "user", "content": "hi"}]
# Headers after 50 ms without a first token, then a comment every 100 ms: a prefill that
# takes several times that is a request waiting in the queues.
QUEUED = {"sse_headers_after_s": 0.05, "sse_keepalive_s": 0.1}
PREFILL_S = 0.6
COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


@pytest.fixture
def slow_prefill(fakes: FakeStages) -> Iterator[None]:
    fakes.prefill.delay_s = PREFILL_S
    yield
    fakes.prefill.delay_s = 0.0
    fakes.decode.mode = "normal"


def test_continuous_usage_stats_put_the_counts_so_far_on_every_chunk(
    fake_client: TestClient,
) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 3, "stream": True}
    response = fake_client.post(COMPLETIONS, json={**body, "stream_options": options})
    *chunks, usage_only = sse_events(response.text)
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
    events = sse_events(fake_client.post(CHAT, json={**body, "stream_options": options}).text)
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
    events = sse_events(fake_client.post(CHAT, json={**body, "stream_options": options}).text)
    assert [e["usage"] is not None for e in events if "usage" in e] == [True]
    assert "usage" in events[-1] and events[-1]["choices"] == []


def _post(
    fakes: FakeStages, path: str, body: dict[str, Any]
) -> tuple[int, dict[str, str], list[str], AppState]:
    """A streaming POST to a frontend with QUEUED's timings: its status, headers, SSE frames
    (in order, comments included) and the app's state."""

    async def call() -> tuple[list[dict[str, Any]], AppState]:
        app = create_app(fake_config(fakes, **QUEUED))
        try:
            return await asgi_call(app, path, body, asyncio.Event()), app.state.frontend
        finally:
            await app.state.frontend.stages.close()

    messages, state = asyncio.run(call())
    start, *rest = messages
    assert start["type"] == "http.response.start"
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    text = b"".join(m.get("body", b"") for m in rest).decode()
    frames = [frame + "\n\n" for frame in text.split("\n\n") if frame]
    return start["status"], headers, frames, state


@pytest.mark.usefixtures("slow_prefill")
def test_a_queued_stream_sends_its_headers_and_keep_alives_until_its_first_token(
    fakes: FakeStages,
) -> None:
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 2, "stream": True}
    status, headers, frames, _ = _post(fakes, COMPLETIONS, body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    # The sampling-options header is known once the prompt is tokenized: it still goes out.
    assert json.loads(headers["fireworks-sampling-options"])["max_tokens"] == 2
    num_keep_alives = frames.count(KEEP_ALIVE)
    assert num_keep_alives >= 2
    assert frames[:num_keep_alives] == [KEEP_ALIVE] * num_keep_alives
    texts = [json.loads(f.removeprefix("data: "))["choices"][0]["text"] for f in frames[-4:-1]]
    assert texts == ["a", "b", ""] and frames[-1] == "data: [DONE]\n\n"


@pytest.mark.usefixtures("slow_prefill")
@pytest.mark.parametrize("path", [COMPLETIONS, RESPONSES])
def test_a_failure_after_the_headers_is_the_endpoints_error_event(
    fakes: FakeStages, path: str
) -> None:
    fakes.decode.mode = "unavailable"
    prompt = {"input": "hi"} if path == RESPONSES else {"prompt": "hello"}
    body = {"model": MODEL_ID, **prompt, "max_tokens": 2, "stream": True}
    if path == RESPONSES:
        body["max_output_tokens"] = body.pop("max_tokens")
    status, _, frames, state = _post(fakes, path, body)
    assert status == 200 and frames[0] == KEEP_ALIVE
    if path == RESPONSES:
        kind, data = frames[-1].split("\n", 1)
        error = json.loads(data.removeprefix("data: "))
        assert kind == "event: error" and error["sequence_number"] == 0
    else:
        error = json.loads(frames[-2].removeprefix("data: "))["error"]
        assert frames[-1] == "data: [DONE]\n\n"
    assert error["code"] == "stage_unavailable"
    registry = state.server_metrics.registry
    errors = {"status": "503", "kind": "stage_unavailable"}
    assert registry.get_sample_value("llmserve_request_errors_total", errors) == 1
    assert registry.get_sample_value("llmserve_requests_total", {"outcome": "error"}) == 1


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
