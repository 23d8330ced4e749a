"""Body of POST /v1/responses (OpenAI's Responses API), fields ordered like its reference, and
the chat request it runs as: the same chat template, tools grammar and response_format.

Only the fields this server implements are declared; `frontend.api.unsupported` strips the
documented-but-unimplemented ones first, so `extra="forbid"` rejects exactly the unknown ones.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Tag, field_validator

from frontend.api import fields
from frontend.api.fields import invalid, unsupported
from frontend.api.parsing import validate
from frontend.api.response_format import JsonObjectFormat, JsonSchema, TextFormat
from frontend.api.responses_input import InputItem, MessageItem, by_type, chat_messages
from frontend.api.schemas import ChatCompletionRequest, MaxTokens, Probability, Temperature
from frontend.api.tools import DEFAULT_PARAMETERS, TOOL_CHOICES, FunctionDefinition
from frontend.api.unsupported import (
    RESPONSES_REASONING_UNSUPPORTED,
    RESPONSES_STREAM_OPTIONS_UNSUPPORTED,
    RESPONSES_TEXT_UNSUPPORTED,
    RESPONSES_UNSUPPORTED,
    drop_neutral_fields,
)
from services.request_params import SamplingParams

# OpenAI's limits on metadata: 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class JsonSchemaTextFormat(JsonSchema):
    """The Responses form of json_schema: the schema's fields beside "type", not under
    "json_schema"."""

    type: Literal["json_schema"]


TextFormatConfig = Annotated[
    Annotated[TextFormat, Tag("text format")]
    | Annotated[JsonObjectFormat, Tag("json_object format")]
    | Annotated[JsonSchemaTextFormat, Tag("json_schema format")],
    by_type("format", None, "text.format.type must be 'text', 'json_object' or 'json_schema'."),
]


class TextConfig(_Strict):
    format: TextFormatConfig | None = None

    def echoed(self) -> dict[str, Any]:
        # Dumped member by member: pydantic cannot serialize through a callable discriminator.
        shown = self.format.model_dump(by_alias=True, exclude_none=True) if self.format else None
        return {"format": shown or {"type": "text"}}

    def response_format(self) -> dict[str, Any] | None:
        """The chat endpoint's response_format for this format."""
        if self.format is None:
            return None
        if isinstance(self.format, JsonSchemaTextFormat):
            spec = self.format.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
            return {"type": "json_schema", "json_schema": spec}
        return self.format.model_dump(by_alias=True, exclude_none=True)


class Reasoning(_Strict):
    # Accepted without effect, as chat's reasoning_effort: the model does not reason.
    effort: str | int | None = None

    @field_validator("effort", mode="before")
    @classmethod
    def _effort(cls, value: Any) -> str | int | None:
        return fields.reasoning_effort(value)


class FunctionTool(FunctionDefinition):
    """A Responses function tool: the function's fields beside "type", not under "function"."""

    type: Literal["function"]

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: Any) -> Any:
        return dict(DEFAULT_PARAMETERS) if value is None else value

    def chat_tool(self) -> dict[str, Any]:
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": function}


class ResponsesStreamOptions(_Strict):
    # Accepted as the chat endpoints accept it: the last event (response.completed) always
    # carries the usage.
    include_usage: bool | None = None


class ResponsesRequest(_Strict):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: MaxTokens = None
    metadata: Metadata | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    reasoning: Reasoning | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    temperature: Temperature = None
    text: TextConfig | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[FunctionTool] | None = None
    top_p: Probability = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _some_input(cls, value: Any) -> Any:
        if value == []:
            raise invalid("input must be a string or a non-empty list of items.")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> str | dict[str, Any] | None:
        if value is None or (isinstance(value, str) and value in TOOL_CHOICES):
            return value
        if (
            isinstance(value, dict)
            and set(value) == {"type", "name"}
            and value["type"] == "function"
            and isinstance(value["name"], str)
        ):
            return value
        raise invalid(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "name": "<a tool\'s name>"}.'
        )

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        for i, tool in enumerate(value if isinstance(value, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise unsupported(
                    f"tools[{i}]: '{kind}' tools are not supported; only function tools are "
                    "(no built-in tools such as web_search or file_search)."
                )
        return value

    @property
    def input_items(self) -> list[InputItem]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return self.input

    def chat_request(self, conversation: list[InputItem]) -> ChatCompletionRequest:
        """The chat request for `conversation` (previous turns and this input), with the
        instructions as a system message first."""
        messages = chat_messages(conversation)
        if self.instructions:
            messages.insert(0, {"role": "system", "content": self.instructions})
        choice = self.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice["name"]}}
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "response_format": self.text.response_format() if self.text else None,
            "tools": [tool.chat_tool() for tool in self.tools] if self.tools else None,
            "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "stream": self.stream,
            "user": self.user,
            "reasoning_effort": self.reasoning.effort if self.reasoning else None,
        }
        return validate(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None})

    def echoed(self, sampling: SamplingParams, store: bool) -> dict[str, Any]:
        """The request's parameters as a response repeats them, defaults filled in."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": self.reasoning.effort if self.reasoning else None},
            "store": store,
            "temperature": sampling.temperature,
            "text": (self.text or TextConfig()).echoed(),
            "tool_choice": self.tool_choice or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in self.tools or []],
            "top_p": sampling.top_p,
            "truncation": "disabled",
            "user": self.user,
        }


def parse_responses_request(data: dict[str, Any]) -> ResponsesRequest:
    data = drop_neutral_fields(data, RESPONSES_UNSUPPORTED)
    nested = (
        ("reasoning", RESPONSES_REASONING_UNSUPPORTED),
        ("text", RESPONSES_TEXT_UNSUPPORTED),
        ("stream_options", RESPONSES_STREAM_OPTIONS_UNSUPPORTED),
    )
    for name, table in nested:
        if isinstance(data.get(name), dict):
            data[name] = drop_neutral_fields(data[name], table, f"{name}.")
    return validate(ResponsesRequest, data)
