"""A client that leaves aborts its request: decode's call is cancelled, unclaimed KV released.

Driven through the raw ASGI interface so that the disconnect comes exactly when wanted.
"""

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.types import ASGIApp

from frontend.app import create_app
from frontend.context import AppState
from tests.test_frontend_fake_stages import MODEL_ID, FakeStages, fake_config, start_fake_stages

WAIT_S = 5.0


@pytest.fixture
def fakes() -> Iterator[FakeStages]:
    stages = start_fake_stages()
    yield stages
    stages.stop()


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 12345),
        "server": ("127.0.0.1", 8000),
    }


async def asgi_call(
    app: ASGIApp,
    path: str,
    body: dict[str, Any],
    leave: asyncio.Event,
    got_body: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """POSTs `body` to `app`, disconnecting when `leave` is set; returns the ASGI messages
    sent. `got_body` is set when the first non-empty body chunk goes out."""
    messages: list[dict[str, Any]] = []
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": json.dumps(body).encode()}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if got_body is not None and message["type"] == "http.response.body" and message.get("body"):
            got_body.set()

    await asyncio.wait_for(app(_scope(path), receive, send), WAIT_S)
    return messages


async def _call_and_leave(
    fakes: FakeStages, path: str, body: dict[str, Any], leave: asyncio.Event | None
) -> tuple[list[dict[str, Any]], AppState, bool]:
    """Sends `body`, then disconnects when `leave` is set (or once a body chunk arrives).

    Returns the ASGI messages sent, the app state, and whether decode saw its call cancelled.
    """
    app = create_app(fake_config(fakes))
    state: AppState = app.state.frontend
    got_body = asyncio.Event()
    messages = await asgi_call(app, path, body, leave or got_body, got_body)
    # Checked before closing the channels, which would cancel the call anyway.
    cancelled = await asyncio.to_thread(fakes.decode.cancelled.wait, WAIT_S)
    await state.stages.close()  # waits for the Release it may have sent
    return messages, state, cancelled


def test_disconnect_mid_stream_cancels_decode(fakes: FakeStages) -> None:
    fakes.decode.mode = "endless"
    body = {"model": MODEL_ID, "prompt": "hi", "stream": True, "max_tokens": 1000}
    messages, state, cancelled = asyncio.run(_call_and_leave(fakes, "/v1/completions", body, None))
    assert messages[0]["status"] == 200
    assert cancelled
    # Decode had answered, so the KV was its to free: the frontend must not release it too.
    assert fakes.prefill.released == []
    assert state.in_flight.count == 0


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_decode_answers_releases_kv(fakes: FakeStages, stream: bool) -> None:
    fakes.decode.mode = "stall"

    async def scenario() -> tuple[list[dict[str, Any]], AppState, bool]:
        leave = asyncio.Event()

        async def leave_once_decode_called() -> None:
            while not fakes.decode.requests:
                await asyncio.sleep(0.01)
            leave.set()

        waiter = asyncio.create_task(leave_once_decode_called())
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
        result = await _call_and_leave(
            fakes, "/v1/chat/completions", {**body, "stream": stream}, leave
        )
        await waiter
        return result

    messages, state, cancelled = asyncio.run(scenario())
    # The request never got to its first token, so the response is the error, not a stream.
    assert messages[0]["status"] == 499
    assert cancelled
    handle_id = fakes.decode.requests[0].kv_handle.handle_id
    assert fakes.prefill.released == [handle_id]
    assert state.in_flight.count == 0
