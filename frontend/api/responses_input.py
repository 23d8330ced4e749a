"""The Responses API's `input` items, and the chat messages they become.

Messages keep their role (instructions roles included); a `function_call` joins the assistant
turn before it as one of its `tool_calls` (or starts one), and a `function_call_output` is the
`tool` message answering it: the turns the chat endpoint already renders.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, TypeAdapter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


ItemStatus = Literal["in_progress", "completed", "incomplete"] | None


def by_type(kind: str, default: str | None, message: str) -> Discriminator:
    """Picks a union member by the value's "type" (`default` when it has none). The tags read
    "<type> <kind>": error locations leave out words that are not identifiers, so a field is
    named `input.0.content` rather than `input.0.message.content`."""

    def tag(value: Any) -> str | None:
        if not isinstance(value, dict):
            return None
        return f"{value.get('type', default)} {kind}"

    return Discriminator(tag, custom_error_type="unsupported_value", custom_error_message=message)


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """A previous reply's text, as this server returned it (annotations and logprobs are
    ignored)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


ContentPart = Annotated[
    Annotated[InputText, Tag("input_text part")] | Annotated[OutputText, Tag("output_text part")],
    by_type(
        "part",
        None,
        "content parts must be input_text or output_text: this model has no image, file or "
        "audio input.",
    ),
]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: ItemStatus = None

    @property
    def text(self) -> str:
        """Parts joined by newlines, as the chat endpoint joins text parts."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text, as the call was returned
    id: str | None = None
    status: ItemStatus = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: ItemStatus = None

    @property
    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "\n".join(part.text for part in self.output)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message item")]
    | Annotated[FunctionCallItem, Tag("function_call item")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output item")],
    by_type(
        "item",
        "message",
        "input items must be messages, function_call or function_call_output items; other "
        "item types are not supported.",
    ),
]
_ITEMS = TypeAdapter(list[InputItem])


def input_items(items: list[dict[str, Any]]) -> list[InputItem]:
    """Output items this server returned, as input items of a later turn."""
    return _ITEMS.validate_python(items)


def chat_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """The chat messages (the chat endpoint's JSON form) that the items amount to."""
    messages: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # call_id -> the function it called, for its output
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallItem):
            call_names[item.call_id] = item.name
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        else:
            tool = {"role": "tool", "tool_call_id": item.call_id, "content": item.text}
            if item.call_id in call_names:
                tool["name"] = call_names[item.call_id]
            messages.append(tool)
    return messages
