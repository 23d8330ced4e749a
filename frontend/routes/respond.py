"""Runs one validated generation request and answers it as JSON or as an SSE stream.

Shared by /completions and /chat/completions, which differ only in parsing and shape.
"""

import asyncio
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from frontend.api.request import GenerationRequest
from frontend.context import AppState
from frontend.errors import overloaded
from frontend.metrics.request import RequestMetrics, sampling_options_header
from frontend.output.responses import ResponseShape
from frontend.output.streaming import SSEResponse, sse_events

T = TypeVar("T")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def shape_for(
    shape_class: type[ResponseShape], request: GenerationRequest, model: str
) -> ResponseShape:
    want_logprobs = request.sampling.logprobs
    return shape_class(request.id, int(time.time()), model, request.output, want_logprobs)


async def respond(
    http_request: Request,
    state: AppState,
    request: GenerationRequest,
    shape: ResponseShape,
    arrival_ns: int,
) -> Response:
    limit = state.config.max_requests
    if state.in_flight.count >= limit:
        raise overloaded(
            f"The server has {state.in_flight.count} requests in flight (at most {limit})."
        )
    metrics = RequestMetrics(arrival_ns, num_concurrent_requests=state.in_flight.enter())
    try:
        run = await until_disconnect(http_request, state.pipeline.start(request, metrics))
    except BaseException:
        state.in_flight.leave()
        raise
    headers = sampling_options_header(request.sampling_options(run.prompts[0].max_tokens))
    if request.output.stream:

        def on_close() -> None:
            run.close()
            state.in_flight.leave()

        events = sse_events(
            run,
            shape,
            include_usage=request.output.include_usage,
            perf_metrics_in_response=request.output.perf_metrics_in_response,
        )
        return SSEResponse(events, on_close, headers)
    try:
        await until_disconnect(http_request, state.pipeline.collect(run))
    finally:
        run.close()
        state.in_flight.leave()
    body = shape.body(run.choices, run.usage())
    if request.output.perf_metrics_in_response:
        body["perf_metrics"] = metrics.as_dict()
    return JSONResponse(body, headers={**metrics.headers(), **headers})


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Awaits `work`, cancelling it if the client disconnects first (then ClientDisconnect)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op when it is done; otherwise its own cleanup runs on cancel
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnect()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message the server sends is the disconnect (servers
    # and test clients alike also send it once the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass
