"""Runs one validated generation request and answers it as JSON or as an SSE stream.

Shared by /completions and /chat/completions, which differ only in parsing and shape, and by
/responses, which answers with its own events and body.
"""

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
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
from frontend.run.pipeline import Run

T = TypeVar("T")

logger = logging.getLogger(__name__)

# What a run is answered with: its SSE events, or its JSON body once every choice has ended.
RunEvents = Callable[[Run], AsyncGenerator[str, None]]
RunBody = Callable[[Run], dict[str, Any]]


def shape_for(
    shape_class: type[ResponseShape], request: GenerationRequest, model: str, response_id: str
) -> ResponseShape:
    want_logprobs = request.sampling.logprobs
    return shape_class(response_id, int(time.time()), model, request.output, want_logprobs)


async def respond(
    http_request: Request,
    state: AppState,
    request: GenerationRequest,
    shape: ResponseShape,
    arrival_ns: int,
) -> Response:
    """Answers in the shape of /completions or /chat/completions."""
    output = request.output

    def events(run: Run) -> AsyncGenerator[str, None]:
        return sse_events(
            run,
            shape,
            include_usage=output.include_usage,
            continuous_usage_stats=request.continuous_usage_stats,
            perf_metrics_in_response=output.perf_metrics_in_response,
        )

    def body(run: Run) -> dict[str, Any]:
        body = shape.body(run.choices, run.usage())
        if output.perf_metrics_in_response:
            body["perf_metrics"] = run.metrics.as_dict()
        return body

    return await answer(http_request, state, request, arrival_ns, events, body)


async def answer(
    http_request: Request,
    state: AppState,
    request: GenerationRequest,
    arrival_ns: int,
    events: RunEvents,
    body: RunBody,
) -> Response:
    """Runs the request; streams `events(run)`, or answers `body(run)` once it has ended."""
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
            _log_finished(request, run.usage(), metrics)

        return SSEResponse(events(run), on_close, headers)
    try:
        await until_disconnect(http_request, state.pipeline.collect(run))
    finally:
        run.close()
        state.in_flight.leave()
        _log_finished(request, run.usage(), metrics)
    return JSONResponse(body(run), headers={**metrics.headers(), **headers})


def _log_finished(
    request: GenerationRequest, usage: dict[str, Any], metrics: RequestMetrics
) -> None:
    seconds = (time.monotonic_ns() - metrics.arrival_ns) / 1e9
    logger.info(
        "%s: %d prompt (%d cached) + %d completion tokens in %.3f s",
        request.id,
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
        usage["completion_tokens"],
        seconds,
    )


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
