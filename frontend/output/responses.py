"""Response bodies and stream chunks in the OpenAI/Fireworks shapes, one class per endpoint.

The base class shapes what both endpoints share (envelope, raw_output, token ids); a
subclass says how one choice, its stream deltas and its logprobs look.
"""

import dataclasses
from typing import Any

from frontend.output import logprobs
from frontend.output.tool_parser import CallDelta, ToolCall, ToolCallParser
from frontend.run.choice import ChoiceOutput
from frontend.stages.types import TokenDelta, TokenLogprob
from services.request_params import OutputOptions

JsonObject = dict[str, Any]


class ResponseShape:
    object_name = ""
    chunk_object = ""

    def __init__(
        self, id: str, created: int, model: str, options: OutputOptions, want_logprobs: bool
    ) -> None:
        self.id = id
        self.created = created
        self.model = model
        self.options = options
        self.want_logprobs = want_logprobs

    # Endpoint-specific.
    def _choice(self, index: int, text: str, lps: JsonObject | None, finish: str) -> JsonObject:
        raise NotImplementedError

    def _delta_choice(self, index: int, text: str, lps: JsonObject | None) -> JsonObject:
        raise NotImplementedError

    def _finish_choice(self, index: int, finish_reason: str) -> JsonObject:
        raise NotImplementedError

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> JsonObject:
        raise NotImplementedError

    def opening_chunks(self, choice: ChoiceOutput) -> list[JsonObject]:
        """Chunks before a choice's first delta: the echoed prompt, if any."""
        echo = choice.prompt.echo
        if not echo.text and not echo.logprobs:
            return []
        lps = self._echo_logprobs(choice) if self.want_logprobs else None
        return [self._chunk(self._delta_choice(choice.index, echo.text, lps))]

    def _echo_logprobs(self, choice: ChoiceOutput) -> JsonObject:
        echo = choice.prompt.echo
        return self._logprobs(echo.logprobs, len(echo.text) - logprobs.num_chars(echo.logprobs))

    # Shared.
    def body(self, choices: list[ChoiceOutput], usage: JsonObject) -> JsonObject:
        return self._wrap(self.object_name, [self._whole(c) for c in choices], usage=usage)

    def _whole(self, choice: ChoiceOutput) -> JsonObject:
        assert choice.finish_reason is not None
        echo = choice.prompt.echo
        lps = None
        if self.want_logprobs:
            lps = self._echo_logprobs(choice)
            _extend(lps, self._logprobs(choice.logprobs, len(echo.text)))
        shaped = self._choice(choice.index, echo.text + choice.text, lps, choice.finish_reason)
        if self.options.raw_output:
            shaped["raw_output"] = self.raw_output(choice)
        if self.options.return_token_ids:
            shaped["prompt_token_ids"] = choice.prompt.token_ids
            shaped["token_ids"] = choice.token_ids
        return shaped

    def raw_output(self, choice: ChoiceOutput) -> JsonObject:
        prompt = choice.prompt
        return {
            "prompt_fragments": [prompt.text],
            "prompt_token_ids": prompt.token_ids,
            "completion": choice.text,
            "completion_token_ids": choice.token_ids,
            "completion_logprobs": (
                logprobs.raw(choice.logprobs, 0) if self.want_logprobs else None
            ),
        }

    def delta_chunks(self, choice: ChoiceOutput, delta: TokenDelta) -> list[JsonObject]:
        """The chunks of one decode message: its delta chunk, if it shows anything."""
        chunk = self.delta_chunk(choice, delta)
        return [] if chunk is None else [chunk]

    def delta_chunk(self, choice: ChoiceOutput, delta: TokenDelta) -> JsonObject | None:
        """The chunk of one decode message; None when it shows nothing (no text, and neither
        logprobs nor token ids asked for)."""
        shows_tokens = self.want_logprobs or self.options.return_token_ids
        if not delta.text and not (shows_tokens and delta.token_ids):
            return None
        lps = None
        if self.want_logprobs:
            lps = self._logprobs(delta.logprobs, len(choice.prompt.echo.text) + choice.delta_offset)
        shaped = self._delta_choice(choice.index, delta.text, lps)
        if self.options.return_token_ids:
            shaped["token_ids"] = delta.token_ids
        return self._chunk(shaped)

    def closing_chunks(self, choice: ChoiceOutput) -> list[JsonObject]:
        """Chunks between a choice's last delta and its finish chunk: what was held back."""
        return []

    def finish_chunk(self, choice: ChoiceOutput, **extra: Any) -> JsonObject:
        assert choice.finish_reason is not None
        shaped = self._finish_choice(choice.index, choice.finish_reason)
        if self.options.raw_output:
            shaped["raw_output"] = self.raw_output(choice)
        return self._chunk(shaped, **extra)

    def usage_chunk(self, usage: JsonObject) -> JsonObject:
        return self._wrap(self.chunk_object, [], usage=usage)

    def _chunk(self, choice: JsonObject, **extra: Any) -> JsonObject:
        return self._wrap(self.chunk_object, [choice], **extra)

    def _wrap(self, object: str, choices: list[JsonObject], **extra: Any) -> JsonObject:
        return {
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


class CompletionShape(ResponseShape):
    """/v1/completions; stream chunks are `text_completion` objects too."""

    object_name = chunk_object = "text_completion"

    def _choice(self, index: int, text: str, lps: JsonObject | None, finish: str) -> JsonObject:
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": finish}

    def _delta_choice(self, index: int, text: str, lps: JsonObject | None) -> JsonObject:
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": None}

    def _finish_choice(self, index: int, finish_reason: str) -> JsonObject:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> JsonObject:
        return logprobs.legacy(entries, offset)


class ChatShape(ResponseShape):
    """/v1/chat/completions: a `chat.completion`, or `chat.completion.chunk`s that open with
    the assistant role and close with an empty delta carrying the finish reason.

    With tools (`options.tool_calls`), `<tool_call>` blocks in the output become the message's
    `tool_calls`, streamed as OpenAI's `delta.tool_calls`, and finish_reason "stop" becomes
    "tool_calls" when there is one."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsers: dict[int, ToolCallParser] = {}  # by choice index, while streaming

    def _choice(self, index: int, text: str, lps: JsonObject | None, finish: str) -> JsonObject:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": lps, "finish_reason": finish}

    def _delta_choice(self, index: int, text: str, lps: JsonObject | None) -> JsonObject:
        return {"index": index, "delta": {"content": text}, "logprobs": lps, "finish_reason": None}

    def _finish_choice(self, index: int, finish_reason: str) -> JsonObject:
        parser = self._parsers.get(index)
        finish_reason = _tool_finish(finish_reason, parser.calls if parser else [])
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> JsonObject:
        return logprobs.chat(entries)

    def opening_chunks(self, choice: ChoiceOutput) -> list[JsonObject]:
        role = {"role": "assistant", "content": ""}
        opening = {"index": choice.index, "delta": role, "logprobs": None, "finish_reason": None}
        return [self._chunk(opening), *super().opening_chunks(choice)]

    def _whole(self, choice: ChoiceOutput) -> JsonObject:
        shaped = super()._whole(choice)
        if not self.options.tool_calls:
            return shaped
        parser = ToolCallParser()
        parser.feed(choice.text)
        parser.finish()
        if parser.calls:
            message = shaped["message"]
            content = choice.prompt.echo.text + parser.content
            message["content"] = content if content.strip() else None
            message["tool_calls"] = [_call_json(call) for call in parser.calls]
            shaped["finish_reason"] = _tool_finish(shaped["finish_reason"], parser.calls)
        return shaped

    def delta_chunks(self, choice: ChoiceOutput, delta: TokenDelta) -> list[JsonObject]:
        """Content (and logprobs) as usual, then a chunk per call announcement or run of
        argument text: OpenAI's stream shape."""
        if not self.options.tool_calls:
            return super().delta_chunks(choice, delta)
        parser = self._parsers.setdefault(choice.index, ToolCallParser())
        parsed = parser.feed(delta.text)
        chunks = super().delta_chunks(choice, dataclasses.replace(delta, text=parsed.content))
        return chunks + [self._call_chunk(choice.index, call) for call in parsed.calls]

    def closing_chunks(self, choice: ChoiceOutput) -> list[JsonObject]:
        parser = self._parsers.get(choice.index)
        if parser is None:
            return []
        content = parser.finish().content  # arguments were streamed as they came
        return [self._chunk(self._delta_choice(choice.index, content, None))] if content else []

    def _call_chunk(self, index: int, call: CallDelta) -> JsonObject:
        delta = {"tool_calls": [_call_delta_json(call)]}
        return self._chunk(
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        )


def _tool_finish(finish_reason: str, calls: list[ToolCall]) -> str:
    """A reply that ends after its calls is finished by them; one cut short stays "length"."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def _call_json(call: ToolCall) -> JsonObject:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


def _call_delta_json(delta: CallDelta) -> JsonObject:
    """The first delta of a call carries its id, type and name; later ones only arguments."""
    shaped: JsonObject = {"index": delta.index}
    function: JsonObject = {"arguments": delta.arguments}
    if delta.id is not None:
        shaped.update(id=delta.id, type="function")
        function = {"name": delta.name, **function}
    shaped["function"] = function
    return shaped


def _extend(into: JsonObject, more: JsonObject) -> None:
    """Appends the lists of one logprobs object to another's of the same shape."""
    for key, values in more.items():
        into[key] = into[key] + values
