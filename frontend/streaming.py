"""Server-sent events: the chunk sequence of one generation, and a response that notices when
the client leaves."""

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from frontend.errors import ApiError, internal_error
from frontend.pipeline import Generation
from frontend.responses import ResponseShape, usage
from frontend.stage_types import TokenDelta

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_events(
    generation: Generation,
    first: TokenDelta,
    shape: ResponseShape,
    *,
    include_usage: bool,
    perf_metrics_in_response: bool,
) -> AsyncGenerator[str, None]:
    """Chunks from decode's first message to [DONE]; a failure mid-stream becomes an error
    event, since the 200 status line has already gone out."""
    try:
        for chunk in shape.opening_chunks():
            yield sse(chunk)
        delta: TokenDelta | None = first
        while delta is not None:
            if delta.text:
                yield sse(shape.delta_chunk(delta.text))
            if delta.finish_reason is not None:
                totals = usage(
                    generation.num_prompt_tokens,
                    generation.num_generated,
                    generation.metrics.cached_prompt_tokens,
                )
                final = shape.final_chunk(delta.finish_reason, totals)
                if perf_metrics_in_response:
                    final["perf_metrics"] = generation.metrics.as_dict()
                yield sse(final)
                if include_usage:
                    yield sse(shape.usage_chunk(totals))
            delta = await generation.next()
    except ApiError as exc:
        yield sse(exc.body())
    except Exception:
        logger.exception("stream failed")
        yield sse(internal_error().body())
    finally:
        generation.close()
    yield DONE


class SSEResponse(StreamingResponse):
    """Streams events while listening for the client's disconnect, whatever the ASGI version.

    Starlette only listens on ASGI < 2.4 and otherwise notices a gone client when a send
    fails, which may be many tokens later; a gone client must abort decode at once.
    `on_close` runs exactly once, however the stream ends.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as task_group:

                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    task_group.cancel_scope.cancel()

                task_group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                task_group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
            self._on_close()
