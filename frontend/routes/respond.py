"""Runs one validated generation request and answers it as JSON or as an SSE stream.

Shared by /completions and /chat/completions, which differ only in parsing and shape, and by
/responses, which answers with its own events and body.
"""

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from frontend.api.request import GenerationRequest
from frontend.context import AppState, get_state
from frontend.errors import overloaded
from frontend.metrics.request import RequestMetrics, sampling_options_header
from frontend.output.responses import ResponseShape
from frontend.output.sse_response import ErrorEvents, RunEvents, RunStream, SSEResponse
from frontend.output.streaming import error_events, sse_events
from frontend.run.pipeline import Run, abandon

T = TypeVar("T")
Route = Callable[[Request], Awaitable[Response]]

logger = logging.getLogger(__name__)

# What a run is answered with when it is not streamed: its JSON body once every choice ended.
RunBody = Callable[[Run], dict[str, Any]]


def counted(route: Route) -> Route:
    """A generation route that counts its request's outcome once, whatever ends it (a
    stream counts its own when it ends)."""

    @functools.wraps(route)
    async def counting(request: Request) -> Response:
        metrics = get_state(request).server_metrics
        try:
            response = await route(request)
        except (ClientDisconnect, asyncio.CancelledError):
            metrics.observe_outcome("aborted")
            raise
        except Exception:
            metrics.observe_outcome("error")
            raise
        if not isinstance(response, SSEResponse):
            metrics.observe_outcome("completed")
        return response

    return counting


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

    return await answer(http_request, state, request, arrival_ns, events, error_events, body)


async def answer(
    http_request: Request,
    state: AppState,
    request: GenerationRequest,
    arrival_ns: int,
    events: RunEvents,
    failed: ErrorEvents,
    body: RunBody,
) -> Response:
    """Runs the request; streams `events(run)` (`failed(error)` once the status line is out),
    or answers `body(run)` once it has ended.

    A stream's status line and headers go out with its first token, or with a keep-alive
    comment once it has waited `sse_headers_after_s` in the queues: a failure before then
    (a stage's 400, 429 or 503) is still answered with its own status."""
    limit = state.config.max_requests
    if state.in_flight.count >= limit:
        raise overloaded(
            f"The server has {state.in_flight.count} requests in flight (at most {limit})."
        )
    metrics = RequestMetrics(arrival_ns, num_concurrent_requests=state.in_flight.enter())
    fitted_max_tokens: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    starting = asyncio.ensure_future(state.pipeline.start(request, metrics, fitted_max_tokens))
    try:
        if not request.output.stream:
            run = await until_disconnect(http_request, starting)
        else:
            grace_s = state.config.sse_headers_after_s
            headers_due = _headers_due(starting, fitted_max_tokens, grace_s)
            await until_disconnect(http_request, headers_due)
            if starting.done():
                starting.result()  # a failure is answered with its status
    except BaseException:
        abandon(starting)
        state.in_flight.leave()
        raise
    if request.output.stream:
        max_tokens = fitted_max_tokens.result()
        return _stream(state, request, metrics, starting, max_tokens, events, failed)
    headers = sampling_options_header(request.sampling_options(run.prompts[0].max_tokens))
    try:
        await until_disconnect(http_request, state.pipeline.collect(run))
    finally:
        run.close()
        state.in_flight.leave()
        _log_finished(request, run.usage(), metrics)
    return JSONResponse(body(run), headers={**metrics.headers(), **headers})


async def _headers_due(
    starting: asyncio.Future[Run], max_tokens: asyncio.Future[int], grace_s: float
) -> None:
    """Until the run has started, or it has had `grace_s` to be refused and its first
    prompt's max_tokens (for the sampling-options header) is known."""
    await asyncio.wait({starting}, timeout=grace_s)
    if not starting.done():
        await asyncio.wait({starting, max_tokens}, return_when=asyncio.FIRST_COMPLETED)


def _stream(
    state: AppState,
    request: GenerationRequest,
    metrics: RequestMetrics,
    starting: asyncio.Future[Run],
    max_tokens: int,
    events: RunEvents,
    failed: ErrorEvents,
) -> SSEResponse:
    server_metrics = state.server_metrics
    keepalive_s = state.config.sse_keepalive_s
    stream = RunStream(request.id, starting, keepalive_s, server_metrics, events, failed)

    def on_close() -> None:
        stream.close()
        state.in_flight.leave()
        server_metrics.observe_outcome(stream.outcome)
        if stream.run is not None:
            _log_finished(request, stream.run.usage(), metrics)

    headers = sampling_options_header(request.sampling_options(max_tokens))
    return SSEResponse(stream.events(), on_close, headers)


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
