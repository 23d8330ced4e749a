"""`tools`, `tool_choice`, `parallel_tool_calls` and the tool calls of assistant messages.

The request's shape is checked here; what it asks for becomes a "tool_calls" grammar (the stages
compile and enforce it: calls in the default format of `services.tool_format`, each call's
arguments valid under its tool's parameters schema) and the tools' JSON, which the tokenizer
renders into the prompt.
"""

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from frontend.api.fields import invalid
from frontend.errors import invalid_request
from services.request_params import Grammar
from services.tool_format import NAME_PATTERN

TOOL_CHOICES = ("none", "auto", "required")
# A function without parameters takes an empty object.
DEFAULT_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

MAX_TOOLS = 128  # as OpenAI


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PARAMETERS))
    strict: bool | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _object_schema(cls, value: Any) -> Any:
        if value == {}:
            return dict(DEFAULT_PARAMETERS)
        if isinstance(value, dict) and value.get("type") != "object":
            raise invalid('parameters must be a JSON schema of "type": "object".')
        return value


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


@dataclass(slots=True, frozen=True)
class ToolUse:
    """What a chat request's tools ask of the stages."""

    grammar: Grammar | None = None  # None: the reply is plain text, nothing is parsed
    tools_json: str = ""  # the tools the prompt lists, as the OpenAI JSON list; "" for none


def tool_choice_value(value: Any) -> str | dict[str, Any] | None:
    """One of TOOL_CHOICES, or a function by name: {"type": "function", "function": {"name"}}."""
    if value is None or (isinstance(value, str) and value in TOOL_CHOICES):
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if (
        isinstance(function, dict)
        and set(value) == {"type", "function"}
        and value["type"] == "function"
        and set(function) == {"name"}
        and isinstance(function["name"], str)
    ):
        return {"type": "function", "function": {"name": function["name"]}}
    raise invalid(
        'tool_choice must be "none", "auto", "required" or '
        '{"type": "function", "function": {"name": "<a tool\'s name>"}}.'
    )


def message_tool_calls(value: Any) -> list[dict[str, Any]]:
    """An assistant's calls: [{"id", "type": "function", "function": {"name", "arguments"}}],
    arguments as JSON text (as the API returned them)."""
    if not isinstance(value, list):
        raise invalid("tool_calls must be a list of tool calls.")
    calls = []
    for i, call in enumerate(value):
        if not isinstance(call, dict) or set(call) - {"id", "type", "function"}:
            raise invalid(f'tool_calls[{i}] must be {{"id", "type", "function"}}.')
        function = call.get("function")
        if call.get("type") != "function" or not isinstance(call.get("id"), str):
            raise invalid(f'tool_calls[{i}] needs a string id and "type": "function".')
        if not isinstance(function, dict) or set(function) != {"name", "arguments"}:
            raise invalid(f'tool_calls[{i}].function must be {{"name", "arguments"}}.')
        if not isinstance(function["name"], str) or not isinstance(function["arguments"], str):
            raise invalid(f"tool_calls[{i}].function's name and arguments must be strings.")
        calls.append({"id": call["id"], "type": "function", "function": dict(function)})
    return calls


def tool_use(
    tools: list[Tool] | None, tool_choice: str | dict[str, Any] | None, parallel: bool | None
) -> ToolUse:
    """The grammar and the prompt's tools. As in OpenAI's API, tool_choice defaults to "auto"
    with tools, and "none" renders the prompt without them."""
    choice = tool_choice or "auto"
    if not tools:
        if choice not in ("none", "auto"):
            raise invalid_request(f"tool_choice {json.dumps(choice)} needs tools.", "tool_choice")
        return ToolUse()
    if choice == "none":
        return ToolUse()
    if len(tools) > MAX_TOOLS:
        raise invalid_request(f"tools: at most {MAX_TOOLS} tools are allowed.", "tools")
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise invalid_request("tools: function names must be unique.", "tools")
    chosen, mode = tools, choice
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in names:
            raise invalid_request(
                f"tool_choice names function '{name}', which is not among the tools.",
                "tool_choice",
            )
        chosen, mode = [tools[names.index(name)]], "required"
    source = {
        "tools": [{"name": t.function.name, "parameters": t.function.parameters} for t in chosen],
        "mode": mode,
        "parallel": parallel is not False,
    }
    listed = [tool.model_dump(exclude_none=True) for tool in tools]
    return ToolUse(
        Grammar("tool_calls", json.dumps(source), strict=True),
        json.dumps(listed, ensure_ascii=False),
    )
