"""Runs one validated generation request and answers it as JSON or as an SSE stream.

Shared by /completions and /chat/completions, which differ only in parsing and shape.
"""

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from frontend.context import AppState
from frontend.errors import invalid_request
from frontend.metrics import RequestMetrics
from frontend.pipeline import GenerationSettings, PromptSource
from frontend.responses import ResponseShape, usage
from frontend.schemas import ChatCompletionRequest, CompletionRequest
from frontend.stage_types import PromptCache, Sampling
from frontend.streaming import SSEResponse, sse_events

T = TypeVar("T")

# OpenAI's defaults.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
# Seeds are drawn below 2**63 so they survive any signed 64-bit hop.


@dataclass(slots=True)
class Job:
    request_id: str
    source: PromptSource
    settings: GenerationSettings
    stream: bool
    include_usage: bool
    perf_metrics_in_response: bool


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def settings_from(
    request: CompletionRequest | ChatCompletionRequest, default_max_tokens: int
) -> GenerationSettings:
    """The fields both endpoints share, with OpenAI's defaults filled in."""
    max_tokens = request.max_tokens
    if request.max_completion_tokens is not None:
        if max_tokens is not None:
            raise invalid_request(
                "max_completion_tokens is an alias of max_tokens; set only one of them.",
                "max_completion_tokens",
            )
        max_tokens = request.max_completion_tokens
    return GenerationSettings(
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        sampling=Sampling(
            temperature=_default(request.temperature, DEFAULT_TEMPERATURE),
            top_p=_default(request.top_p, DEFAULT_TOP_P),
            top_k=request.top_k or 0,
            seed=request.seed,
        ),
        stop=request.stop,
        ignore_eos=bool(request.ignore_eos),
        error_on_overflow=request.context_length_exceeded_behavior == "error",
        cache=PromptCache(
            isolation_key=request.prompt_cache_isolation_key or "",
            max_tokens=request.prompt_cache_max_len,
        ),
    )


def job_from(
    request: CompletionRequest | ChatCompletionRequest,
    request_id: str,
    source: PromptSource,
    default_max_tokens: int,
) -> Job:
    options = request.stream_options
    return Job(
        request_id=request_id,
        source=source,
        settings=settings_from(request, default_max_tokens),
        stream=bool(request.stream),
        include_usage=bool(options and options.include_usage),
        perf_metrics_in_response=bool(request.perf_metrics_in_response),
    )


async def respond(
    request: Request, state: AppState, job: Job, shape: ResponseShape, arrival_ns: int
) -> Response:
    metrics = RequestMetrics(arrival_ns, num_concurrent_requests=state.in_flight.enter())
    try:
        generation, first = await until_disconnect(
            request, state.pipeline.start(job.request_id, job.source, job.settings, metrics)
        )
    except BaseException:
        state.in_flight.leave()
        raise
    if job.stream:

        def on_close() -> None:
            generation.close()
            state.in_flight.leave()

        events = sse_events(
            generation,
            first,
            shape,
            include_usage=job.include_usage,
            perf_metrics_in_response=job.perf_metrics_in_response,
        )
        return SSEResponse(events, on_close)
    try:
        completion = await until_disconnect(request, state.pipeline.collect(generation, first))
    finally:
        generation.close()
        state.in_flight.leave()
    totals = usage(
        completion.num_prompt_tokens,
        completion.num_completion_tokens,
        metrics.cached_prompt_tokens,
    )
    body = shape.body(completion.text, completion.finish_reason, totals)
    if job.perf_metrics_in_response:
        body["perf_metrics"] = metrics.as_dict()
    return JSONResponse(body, headers=metrics.headers())


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


def _default(value: float | None, default: float) -> float:
    return default if value is None else value
