"""Checks of request fields whose JSON forms vary, each returning the one form we use.

Raised errors become a 400 naming the field (see frontend.api.parsing).
"""

import math
from typing import Any

from pydantic_core import PydanticCustomError

INT32_MAX = 2**31 - 1
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS_ENTRIES = 300  # as OpenAI
MAX_TOP_LOGPROBS = 5
MAX_LOGIT_BIAS = 100.0
REASONING_EFFORTS = ("low", "medium", "high", "none")

# One prompt: text, or token ids.
Prompt = str | list[int]


def invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_value", message)


def stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop takes at most {MAX_STOP_SEQUENCES} sequences.")
    if any(not s for s in stops):
        raise invalid("stop sequences must not be empty.")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(f"stop sequences must be at most {MAX_STOP_CHARS} characters long.")
    return stops


def logit_bias_map(value: Any) -> dict[int, float] | None:
    """{"123": 5} (JSON keys are strings) or {123: 5} -> {123: 5.0}; ids checked later
    against the vocabulary, which only the stages know."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("logit_bias must be an object mapping token ids to biases.")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise invalid(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries.")
    biases = {}
    for key, bias in value.items():
        token_id = _token_id_key(key)
        if isinstance(bias, bool) or not isinstance(bias, int | float) or math.isnan(bias):
            raise invalid(f"logit_bias[{key!r}] must be a number.")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise invalid(f"logit_bias[{key!r}] must be between -100 and 100.")
        biases[token_id] = float(bias)
    return biases


def _token_id_key(key: Any) -> int:
    if type(key) is int:
        token_id = key
    elif isinstance(key, str) and key.isascii() and key.isdigit():
        token_id = int(key)
    else:
        raise invalid(f"logit_bias key {key!r} is not a token id.")
    if not 0 <= token_id <= INT32_MAX:
        raise invalid(f"logit_bias key {key!r} is not a token id.")
    return token_id


def completion_logprobs(value: Any) -> bool | int | None:
    """A boolean (OpenAI), or the legacy integer: how many alternatives per token."""
    if value is None or isinstance(value, bool):
        return value
    if type(value) is int and 0 <= value <= MAX_TOP_LOGPROBS:
        return value
    raise invalid(f"logprobs must be a boolean or an integer from 0 to {MAX_TOP_LOGPROBS}.")


def reasoning_effort(value: Any) -> str | int | None:
    if value is None or value in REASONING_EFFORTS:
        return value
    if type(value) is int and value >= 0:
        return value
    names = ", ".join(repr(e) for e in REASONING_EFFORTS)
    raise invalid(f"reasoning_effort must be one of {names} or a non-negative integer.")


def no_images(value: Any) -> None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise invalid("images must be a list of base64 data URLs.")
    raise invalid("this model has no vision input; images cannot be used.")


def prompt_list(value: Any) -> list[Prompt]:
    """Every documented prompt form as a list of prompts, each text or token ids."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise invalid("prompt must be a string, a list of strings or a list of token ids.")
    if not value:
        raise invalid("prompt must not be empty.")
    if all(type(x) is int for x in value):
        return [_token_ids(value)]
    if all(isinstance(x, str) for x in value):
        return list(value)
    if all(isinstance(x, list) for x in value):
        return [_token_ids(x) for x in value]
    raise invalid("prompt must be a string, a list of strings or a list of token ids.")


def _token_ids(value: list[Any]) -> list[int]:
    if not value:
        raise invalid("a token-id prompt must not be empty.")
    if not all(type(x) is int for x in value):
        raise invalid("a token-id prompt must be a list of integers.")
    if any(not 0 <= x <= INT32_MAX for x in value):
        raise invalid("token ids in prompt must be non-negative 32-bit integers.")
    return value


def text_content(value: Any) -> str:
    """Message content as one string; text parts are joined by newlines (as vLLM does)."""
    return "\n".join(_text_parts(value, "content"))


def _text_parts(value: Any, name: str) -> list[str]:
    """A string, or the OpenAI list of text parts, as the list of its texts."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise invalid(f"{name} must be a string or a list of text parts.")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise invalid(f"{name}[{i}] must be an object.")
        kind = part.get("type")
        if kind in ("image_url", "input_image", "image"):
            raise invalid(f"{name}[{i}]: this model has no vision input.")
        if kind != "text":
            if isinstance(kind, str):
                raise unsupported(f"{name}[{i}]: part type '{kind}' is not supported yet.")
            raise invalid(f"{name}[{i}].type must be 'text'.")
        if not isinstance(part.get("text"), str):
            raise invalid(f"{name}[{i}].text must be a string.")
        unknown = sorted(set(part) - {"type", "text"})
        if unknown:
            raise invalid(f"{name}[{i}] has an unknown field '{unknown[0]}'.")
        texts.append(part["text"])
    return texts


def prediction_text(value: Any) -> str | None:
    """OpenAI's predicted output, `{"type": "content", "content": text or text parts}`, or
    the text alone, as the text the output is expected to repeat (parts concatenated)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise invalid('prediction must be a string or {"type": "content", "content": ...}.')
    if value.get("type") != "content":
        raise invalid("prediction.type must be 'content'.")
    unknown = sorted(set(value) - {"type", "content"})
    if unknown:
        raise invalid(f"prediction has an unknown field '{unknown[0]}'.")
    if "content" not in value:
        raise invalid("prediction.content is required.")
    return "".join(_text_parts(value["content"], "prediction.content"))


def speculation(value: Any) -> str | list[int] | None:
    """Text or token ids the output is expected to repeat."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(type(x) is int for x in value):
        raise invalid("speculation must be a string or a list of token ids.")
    if any(not 0 <= x <= INT32_MAX for x in value):
        raise invalid("token ids in speculation must be non-negative 32-bit integers.")
    return value
