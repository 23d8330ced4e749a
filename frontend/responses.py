"""Response bodies and stream chunks in the OpenAI/Fireworks shapes, one class per endpoint."""

from dataclasses import dataclass
from typing import Any, Protocol

JsonObject = dict[str, Any]


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> JsonObject:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


class ResponseShape(Protocol):
    def body(self, text: str, finish_reason: str, usage: JsonObject) -> JsonObject: ...

    def opening_chunks(self) -> list[JsonObject]: ...

    def delta_chunk(self, text: str) -> JsonObject: ...

    def final_chunk(self, finish_reason: str, usage: JsonObject) -> JsonObject: ...

    def usage_chunk(self, usage: JsonObject) -> JsonObject: ...


@dataclass(slots=True)
class _Envelope:
    id: str
    created: int
    model: str

    def _wrap(self, object: str, choices: list[JsonObject], **extra: Any) -> JsonObject:
        return {
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


class CompletionShape(_Envelope):
    """/v1/completions; stream chunks are `text_completion` objects too."""

    def body(self, text: str, finish_reason: str, usage: JsonObject) -> JsonObject:
        return self._wrap("text_completion", [_text_choice(text, finish_reason)], usage=usage)

    def opening_chunks(self) -> list[JsonObject]:
        return []

    def delta_chunk(self, text: str) -> JsonObject:
        return self._wrap("text_completion", [_text_choice(text, None)])

    def final_chunk(self, finish_reason: str, usage: JsonObject) -> JsonObject:
        return self._wrap("text_completion", [_text_choice("", finish_reason)], usage=usage)

    def usage_chunk(self, usage: JsonObject) -> JsonObject:
        return self._wrap("text_completion", [], usage=usage)


class ChatShape(_Envelope):
    """/v1/chat/completions: a `chat.completion`, or `chat.completion.chunk`s that open with
    the assistant role and close with an empty delta carrying the finish reason."""

    def body(self, text: str, finish_reason: str, usage: JsonObject) -> JsonObject:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
        }
        return self._wrap("chat.completion", [choice], usage=usage)

    def opening_chunks(self) -> list[JsonObject]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def delta_chunk(self, text: str) -> JsonObject:
        return self._chunk({"content": text}, None)

    def final_chunk(self, finish_reason: str, usage: JsonObject) -> JsonObject:
        return self._chunk({}, finish_reason, usage=usage)

    def usage_chunk(self, usage: JsonObject) -> JsonObject:
        return self._wrap("chat.completion.chunk", [], usage=usage)

    def _chunk(self, delta: JsonObject, finish_reason: str | None, **extra: Any) -> JsonObject:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self._wrap("chat.completion.chunk", [choice], **extra)


def _text_choice(text: str, finish_reason: str | None) -> JsonObject:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
