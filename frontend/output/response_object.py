"""The Responses API's answer: the response object, whole, or built by its stream of server-sent
events (`response.created` ... `response.completed`, each with its sequence_number)."""

import itertools
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from frontend.errors import ApiError, internal_error
from frontend.output.response_items import Event, Item, OutputItems
from frontend.output.streaming import sse
from frontend.run.pipeline import Run

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]


@dataclass(slots=True)
class ResponseWriter:
    id: str
    created_at: int
    model: str
    echo: JsonObject  # the request's parameters, as the response repeats them
    tool_calls: bool  # the reply may hold tool calls
    on_finished: Callable[[JsonObject], None]  # called with the finished response

    def body(self, run: Run) -> JsonObject:
        """The finished response of a run whose choice has been read to its end."""
        choice = run.choices[0]
        items = OutputItems(self.tool_calls)
        for text in choice.texts:
            items.feed(text)
        status = _status(choice.finish_reason)
        items.finish(status)
        return self._finished(status, items.items, run)

    async def events(self, run: Run) -> AsyncGenerator[str, None]:
        """Every event from `response.created` to `response.completed` (or `.incomplete`); a
        failure mid-stream becomes an `error` event, since the 200 status line has gone out."""
        numbers = itertools.count()

        def sse_event(event: Event) -> str:
            return f"event: {event['type']}\n{sse({**event, 'sequence_number': next(numbers)})}"

        try:
            started = self._object("in_progress", [], None)
            yield sse_event({"type": "response.created", "response": started})
            yield sse_event({"type": "response.in_progress", "response": started})
            generation, items = run.generations[0], OutputItems(self.tool_calls)
            delta = run.firsts[0]
            while delta is not None:
                for event in items.feed(delta.text):
                    yield sse_event(event)
                delta = await generation.next()
            status = _status(generation.output.finish_reason)
            for event in items.finish(status):
                yield sse_event(event)
            response = self._finished(status, items.items, run)
            yield sse_event({"type": f"response.{status}", "response": response})
        except Exception as exc:
            if not isinstance(exc, ApiError):
                logger.exception("%s: stream failed", self.id)
            error = exc if isinstance(exc, ApiError) else internal_error()
            shown = {"code": error.code, "message": error.message, "param": error.param}
            yield sse_event({"type": "error", **shown})
        finally:
            run.close()

    def _finished(self, status: str, output: list[Item], run: Run) -> JsonObject:
        response = self._object(status, output, _usage(run.usage()))
        self.on_finished(response)
        return response

    def _object(self, status: str, output: list[Item], usage: JsonObject | None) -> JsonObject:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "usage": usage,
            **self.echo,
        }


def _status(finish_reason: str | None) -> str:
    """A reply cut by its token limit is incomplete; one that ended by itself, completed."""
    return "incomplete" if finish_reason == "length" else "completed"


def _usage(usage: JsonObject) -> JsonObject:
    """The chat endpoint's usage in the Responses API's names."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }
