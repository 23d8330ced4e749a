"""The Responses API's answer: the response object, whole, or built by its stream of server-sent
events (`response.created` ... `response.completed`, each with its sequence_number)."""

import itertools
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from frontend.errors import ApiError
from frontend.output.response_items import Event, Item, OutputItems
from frontend.output.streaming import sse
from frontend.run.pipeline import Run

JsonObject = dict[str, Any]


@dataclass(slots=True)
class ResponseWriter:
    id: str
    created_at: int
    model: str
    echo: JsonObject  # the request's parameters, as the response repeats them
    tool_calls: bool  # the reply may hold tool calls
    on_finished: Callable[[JsonObject], None]  # called with the finished response
    _numbers: Iterator[int] = field(default_factory=itertools.count, init=False)

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
        failure is raised (the caller ends the stream with `error_events`)."""
        try:
            started = self._object("in_progress", [], None)
            yield self._sse({"type": "response.created", "response": started})
            yield self._sse({"type": "response.in_progress", "response": started})
            generation, items = run.generations[0], OutputItems(self.tool_calls)
            delta = run.firsts[0]
            while delta is not None:
                for event in items.feed(delta.text):
                    yield self._sse(event)
                delta = await generation.next()
            status = _status(generation.output.finish_reason)
            for event in items.finish(status):
                yield self._sse(event)
            response = self._finished(status, items.items, run)
            yield self._sse({"type": f"response.{status}", "response": response})
        finally:
            run.close()

    def error_events(self, error: ApiError) -> str:
        """The `error` event that ends a stream failing after its status line has gone out."""
        shown = {"code": error.code, "message": error.message, "param": error.param}
        return self._sse({"type": "error", **shown})

    def _sse(self, event: Event) -> str:
        numbered = {**event, "sequence_number": next(self._numbers)}
        return f"event: {event['type']}\n{sse(numbered)}"

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
