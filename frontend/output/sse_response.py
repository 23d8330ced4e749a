"""The HTTP side of a stream: the events of a run that may still be queued, and a response that
notices when the client leaves."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from frontend.errors import ApiError, internal_error
from frontend.metrics.server import ServerMetrics
from frontend.run.pipeline import Run, abandon

logger = logging.getLogger(__name__)

# An SSE comment: clients ignore it, proxies see traffic on a stream that waits in a queue.
KEEP_ALIVE = ": keep-alive\n\n"

# What a run is streamed as (its endpoint's events), and how the stream ends on a failure.
RunEvents = Callable[[Run], AsyncGenerator[str, None]]
ErrorEvents = Callable[[ApiError], str]


@dataclass(slots=True)
class RunStream:
    """A streaming request's events once its status line is out: a keep-alive comment every
    `keepalive_s` while its run is still starting (queued before its first token), then the
    run's events. A failure, before the first token or after, becomes the endpoint's error
    event. `close()` must run however the stream ends; `outcome` then says how it ended."""

    request_id: str
    starting: asyncio.Future[Run]
    keepalive_s: float
    server_metrics: ServerMetrics
    run_events: RunEvents
    error_events: ErrorEvents
    run: Run | None = None
    outcome: str = "aborted"  # until the events end otherwise: the client left

    async def events(self) -> AsyncGenerator[str, None]:
        try:
            while not self.starting.done():
                yield KEEP_ALIVE
                await asyncio.wait({self.starting}, timeout=self.keepalive_s)
            self.run = self.starting.result()
            async with contextlib.aclosing(self.run_events(self.run)) as events:
                async for event in events:
                    yield event
            self.outcome = "completed"
        except Exception as exc:
            if not isinstance(exc, ApiError):
                logger.exception("%s: stream failed", self.request_id)
            error = exc if isinstance(exc, ApiError) else internal_error()
            self.server_metrics.observe_error(error)
            self.outcome = "error"
            yield self.error_events(error)

    def close(self) -> None:
        """Stops the run's start if still under way, else ends the run; idempotent."""
        if self.run is None:
            abandon(self.starting)
        else:
            self.run.close()


class SSEResponse(StreamingResponse):
    """Streams events while listening for the client's disconnect, whatever the ASGI version.

    Starlette only listens on ASGI < 2.4 and otherwise notices a gone client when a send
    fails, which may be many tokens later; a gone client must abort decode at once.
    `on_close` runs exactly once, however the stream ends.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        on_close: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        no_buffering = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, headers={**no_buffering, **(headers or {})})
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
