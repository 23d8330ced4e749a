"""A Responses API reply's output items as its text comes in, and the stream events that build
them: a `message` item (one `output_text` part) for text, a `function_call` item per tool call.

With tools, the text goes through the chat endpoint's ToolCallParser: calls become items, the
rest is text. Text that is only whitespace opens no message (models write it around calls); it
is shown once more text follows, or when the reply ends without any item. One item is open at
a time: a new one closes the last. A whole response is built by feeding decode's deltas as a
stream would, so both have the same items (any split of the text gives the same ones).
"""

import copy
import uuid
from typing import Any

from frontend.output.tool_parser import CallDelta, ToolCallParser

Event = dict[str, Any]  # a stream event without its sequence_number
Item = dict[str, Any]


class OutputItems:
    def __init__(self, tool_calls: bool) -> None:
        self.items: list[Item] = []
        self._parser = ToolCallParser() if tool_calls else None
        self._open: Item | None = None  # the last item, while it is being written
        self._held = ""  # whitespace that no message shows yet

    def feed(self, text: str) -> list[Event]:
        if self._parser is None:
            return self._text(text)
        events: list[Event] = []
        for piece in self._parser.feed(text).pieces:
            events += self._text(piece) if isinstance(piece, str) else self._call(piece)
        return events

    def finish(self, status: str) -> list[Event]:
        """Ends the output; the open item gets `status` ("incomplete" when cut short)."""
        events = self._text(self._parser.finish().content) if self._parser else []
        if not self.items:
            events += self._open_message() + self._append(self._held)
        return events + self._close(status)

    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open["type"] != "message":
            self._held += text
            if not self._held.strip():
                return []
            text, self._held = self._held, ""
            events = self._close("completed") + self._open_message()
        return events + self._append(text)

    def _open_message(self) -> list[Event]:
        message = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        events = self._add(message)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        message["content"].append(part)
        events.append(self._part_event("response.content_part.added", message))
        return events

    def _append(self, text: str) -> list[Event]:
        if not text:
            return []
        assert self._open is not None
        self._open["content"][0]["text"] += text
        return [
            {
                "type": "response.output_text.delta",
                **self._where(self._open),
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }
        ]

    def _call(self, delta: CallDelta) -> list[Event]:
        events: list[Event] = []
        if delta.id is not None:  # announced: its arguments follow
            events = self._close("completed")
            self._held = ""  # whitespace before a call shows nowhere
            call = {
                "id": f"fc_{uuid.uuid4().hex}",
                "type": "function_call",
                "status": "in_progress",
                "call_id": delta.id,
                "name": delta.name,
                "arguments": "",
            }
            events += self._add(call)
        if delta.arguments:  # the open item's: a call's arguments follow its announcement
            call = self._open
            assert call is not None and call["type"] == "function_call"
            call["arguments"] += delta.arguments
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    **self._where(call),
                    "delta": delta.arguments,
                }
            )
        return events

    def _add(self, item: Item) -> list[Event]:
        self.items.append(item)
        self._open = item
        return [self._item_event("response.output_item.added", item)]

    def _close(self, status: str) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        if item["type"] == "message":
            events = [
                {
                    "type": "response.output_text.done",
                    **self._where(item),
                    "content_index": 0,
                    "text": item["content"][0]["text"],
                    "logprobs": [],
                },
                self._part_event("response.content_part.done", item),
            ]
        else:
            events = [
                {
                    "type": "response.function_call_arguments.done",
                    **self._where(item),
                    "arguments": item["arguments"],
                }
            ]
        return events + [self._item_event("response.output_item.done", item)]

    def _where(self, item: Item) -> Event:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def _item_event(self, kind: str, item: Item) -> Event:
        # A copy: the item goes on changing after the event is made.
        return {"type": kind, "output_index": self.items.index(item), "item": copy.deepcopy(item)}

    def _part_event(self, kind: str, message: Item) -> Event:
        part = copy.deepcopy(message["content"][0])
        return {"type": kind, **self._where(message), "content_index": 0, "part": part}
