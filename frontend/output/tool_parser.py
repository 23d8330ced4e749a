"""Tool calls out of generated text as it streams, in the default tool format.

The text outside `<tool_call>` blocks is content; each block is a call. Text that may be the
start of a block is held back until it is clear, so streamed content never shows part of a
call. A call is announced (id and name) once its name is complete, and its arguments stream as
they are generated: the arguments end where their JSON object does, which a JSON decoder finds
even when a string inside holds a brace or a closing tag. The grammar fixes the block's layout;
anything that does not follow it is content.

The same parser shapes whole responses (fed the whole text at once), so a streamed call and a
whole one are the same call, arguments byte for byte.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

from services.tool_format import ARGUMENTS_OPEN, CALL_END, CALL_OPEN, NAME_OPEN

_NAME_CHARS = re.compile(r"[A-Za-z0-9_-]*")
_DECODER = json.JSONDecoder()

_TEXT, _HEADER, _ARGUMENTS, _TRAILER = range(4)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # JSON text as generated; unfinished if the output was cut short


@dataclass(slots=True)
class CallDelta:
    """Call `index` announced (id and name, no arguments yet), or more of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Parsed:
    """One feed's output: content text, then call deltas in order (a call's argument text
    from one feed in one delta); `pieces` has both in the order they came in the text."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)
    pieces: list[str | CallDelta] = field(default_factory=list)

    def add_content(self, text: str) -> None:
        if text:
            self.content += text
            self.pieces.append(text)

    def add_call(self, call: CallDelta) -> None:
        self.calls.append(call)
        self.pieces.append(call)

    def add_arguments(self, index: int, text: str) -> None:
        last = self.calls[-1] if self.calls else None
        if last is None or last.index != index or last.id is not None:
            last = CallDelta(index)
            self.add_call(last)
        last.arguments += text


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""  # all content so far
        self._state = _TEXT
        self._pending = ""  # text held back (or, in arguments, not yet decoded as complete)

    def feed(self, text: str) -> Parsed:
        parsed = Parsed()
        self._pending += text
        while self._step(parsed):
            pass
        self.content += parsed.content
        return parsed

    def finish(self) -> Parsed:
        """Flushes what was held back: an unfinished block header is content after all."""
        parsed = Parsed()
        if self._state == _TEXT:
            parsed.add_content(self._pending)
        elif self._state == _HEADER:
            parsed.add_content(CALL_OPEN + self._pending)
        # Unfinished arguments were streamed already; an unfinished trailer shows nothing.
        self._pending = ""
        self._state = _TEXT
        self.content += parsed.content
        return parsed

    def _step(self, parsed: Parsed) -> bool:
        """Consumes what it can of the pending text; True when it should be called again."""
        if self._state == _TEXT:
            return self._text(parsed)
        if self._state == _HEADER:
            return self._header(parsed)
        if self._state == _ARGUMENTS:
            return self._arguments(parsed)
        return self._trailer()

    def _text(self, parsed: Parsed) -> bool:
        start = self._pending.find(CALL_OPEN)
        if start >= 0:
            parsed.add_content(self._pending[:start])
            self._pending = self._pending[start + len(CALL_OPEN) :]
            self._state = _HEADER
            return True
        held = _partial_suffix(self._pending, CALL_OPEN)
        parsed.add_content(self._pending[: len(self._pending) - held])
        self._pending = self._pending[len(self._pending) - held :]
        return False

    def _header(self, parsed: Parsed) -> bool:
        pending = self._pending
        if not pending.startswith(NAME_OPEN):
            if NAME_OPEN.startswith(pending):
                return False  # not complete yet
            return self._not_a_call(parsed)
        name_match = _NAME_CHARS.match(pending, len(NAME_OPEN))
        assert name_match is not None  # the pattern matches the empty string
        name, rest = name_match.group(), pending[name_match.end() :]
        if not rest.startswith(ARGUMENTS_OPEN):
            return False if ARGUMENTS_OPEN.startswith(rest) else self._not_a_call(parsed)
        if not name:
            return self._not_a_call(parsed)
        call = ToolCall(new_call_id(), name)
        self.calls.append(call)
        parsed.add_call(CallDelta(len(self.calls) - 1, call.id, call.name))
        self._pending = rest[len(ARGUMENTS_OPEN) :]
        self._state = _ARGUMENTS
        return True

    def _not_a_call(self, parsed: Parsed) -> bool:
        parsed.add_content(CALL_OPEN)
        self._state = _TEXT
        return True

    def _arguments(self, parsed: Parsed) -> bool:
        call = self.calls[-1]
        text = call.arguments + self._pending
        end = _json_end(text)
        stop = len(text) if end is None else end
        if stop > len(call.arguments):
            parsed.add_arguments(len(self.calls) - 1, text[len(call.arguments) : stop])
        call.arguments, self._pending = text[:stop], text[stop:]
        if end is None:
            return False
        self._state = _TRAILER
        return True

    def _trailer(self) -> bool:
        if self._pending.startswith(CALL_END):
            self._pending = self._pending[len(CALL_END) :]
            self._state = _TEXT
            return True
        if CALL_END.startswith(self._pending):
            return False
        self._state = _TEXT  # not the block's end: whatever it is, it is text
        return True


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (0 if none)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _json_end(text: str) -> int | None:
    """Where the JSON value at the start of `text` ends; None while it is incomplete."""
    start = len(text) - len(text.lstrip())
    try:
        _, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return end
