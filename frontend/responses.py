"""Response bodies and stream chunks in the OpenAI/Fireworks shapes, one class per endpoint.

The base class shapes what both endpoints share (envelope, raw_output, token ids); a
subclass says how one choice, its stream deltas and its logprobs look.
"""

from typing import Any

from frontend import logprobs
from frontend.generation import ChoiceOutput
from frontend.settings import OutputOptions
from frontend.stage_types import TokenDelta, TokenLogprob

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
    the assistant role and close with an empty delta carrying the finish reason."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _choice(self, index: int, text: str, lps: JsonObject | None, finish: str) -> JsonObject:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": lps, "finish_reason": finish}

    def _delta_choice(self, index: int, text: str, lps: JsonObject | None) -> JsonObject:
        return {"index": index, "delta": {"content": text}, "logprobs": lps, "finish_reason": None}

    def _finish_choice(self, index: int, finish_reason: str) -> JsonObject:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> JsonObject:
        return logprobs.chat(entries)

    def opening_chunks(self, choice: ChoiceOutput) -> list[JsonObject]:
        role = {"role": "assistant", "content": ""}
        opening = {"index": choice.index, "delta": role, "logprobs": None, "finish_reason": None}
        return [self._chunk(opening), *super().opening_chunks(choice)]


def _extend(into: JsonObject, more: JsonObject) -> None:
    """Appends the lists of one logprobs object to another's of the same shape."""
    for key, values in more.items():
        into[key] = into[key] + values
