"""HTTP body -> validated request, every failure a 400 naming the field."""

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from frontend.api.response_format import FORMAT_TYPES
from frontend.api.schemas import ChatCompletionRequest, CompletionRequest
from frontend.api.unsupported import (
    CHAT_UNSUPPORTED,
    COMPLETION_UNSUPPORTED,
    MESSAGE_UNSUPPORTED,
    drop_neutral_fields,
)
from frontend.errors import ApiError, invalid_request

RequestT = TypeVar("RequestT", bound=BaseModel)
# Room for a context window of token ids written as JSON, and then some.
MAX_BODY_BYTES = 8 * 1024 * 1024


async def read_json_object(request: Request) -> dict[str, Any]:
    body = await _read_body(request)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8 and over-long integers as well as bad syntax.
        raise invalid_request(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    if b"\\u" in body and _has_lone_surrogate(data):
        # JSON escapes can spell half a UTF-16 pair, which protobuf cannot encode.
        raise invalid_request(
            "The request body contains an unpaired surrogate (\\uD800-\\uDFFF) escape.",
            code="invalid_json",
        )
    return data


async def _read_body(request: Request) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed MAX_BODY_BYTES."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB.",
        code="request_too_large",
    )


def _has_lone_surrogate(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_completion_request(data: dict[str, Any]) -> CompletionRequest:
    return validate(CompletionRequest, drop_neutral_fields(data, COMPLETION_UNSUPPORTED))


def parse_chat_request(data: dict[str, Any]) -> ChatCompletionRequest:
    data = drop_neutral_fields(data, CHAT_UNSUPPORTED)
    messages = data.get("messages")
    if isinstance(messages, list):
        data["messages"] = [
            drop_neutral_fields(m, MESSAGE_UNSUPPORTED, f"messages.{i}.")
            if isinstance(m, dict)
            else m
            for i, m in enumerate(messages)
        ]
    return validate(ChatCompletionRequest, data)


def validate(model: type[RequestT], data: Mapping[str, Any]) -> RequestT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error_from_validation(exc) from None


def error_from_validation(exc: ValidationError) -> ApiError:
    # Union members report one error each; the deepest location is the most specific.
    errors = exc.errors(include_url=False)
    error = max(errors, key=lambda e: len(_clean_loc(e)))
    param = dotted_param(error)
    kind = error["type"]
    if kind == "missing":
        return invalid_request(
            f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
        )
    if kind == "extra_forbidden":
        return invalid_request(
            f"Unrecognized request argument supplied: '{param}'.", param, "unknown_parameter"
        )
    if kind == "unsupported_value":
        return invalid_request(error["msg"], param, "unsupported_value")
    if kind == "invalid_value":
        return invalid_request(f"Invalid '{param}': {error['msg']}", param, "invalid_value")
    return invalid_request(f"Invalid '{param}': {error['msg']}.", param, "invalid_value")


def dotted_param(error: ErrorDetails) -> str | None:
    """("messages", 0, "content") -> "messages.0.content"."""
    return ".".join(str(part) for part in _clean_loc(error)) or None


def _clean_loc(error: ErrorDetails) -> list[str | int]:
    # Pydantic puts union members and validator kinds in the location ("str",
    # "list[int]", "function-after[...]"); no field of ours is named like that.
    # A tagged union adds its tag too ("response_format.json_schema.json_schema").
    loc = list(error["loc"])
    return [
        part
        for i, part in enumerate(loc)
        if isinstance(part, int)
        or (
            part.isidentifier()
            and part not in _TYPE_TAGS
            and not (i > 0 and loc[i - 1] == "response_format" and part in FORMAT_TYPES)
        )
        or (i == len(loc) - 1 and error["type"] == "extra_forbidden")
    ]


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "NoneType"})
