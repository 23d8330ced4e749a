"""The frontend's tool call parser: the same calls and content however the text is split."""

import pytest

from frontend.output.tool_parser import Parsed, ToolCallParser
from services.tool_format import format_call

# A closing tag and braces inside strings: the arguments end where their JSON does.
WEATHER_ARGUMENTS = '{"city": "Pa}</tool_call>ris", "days": [1, {"a": "}"}]}'
WEATHER = format_call("get_weather", WEATHER_ARGUMENTS)
NOOP = format_call("noop", "{}")


def parse_in_pieces(text: str, size: int) -> tuple[ToolCallParser, list[Parsed]]:
    parser = ToolCallParser()
    outputs = [parser.feed(text[i : i + size]) for i in range(0, len(text), size)]
    return parser, [*outputs, parser.finish()]


def assembled(outputs: list[Parsed]) -> tuple[str, dict[int, str]]:
    content, arguments = "", {}
    for parsed in outputs:
        content += parsed.content
        for delta in parsed.calls:
            arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
    return content, arguments


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (WEATHER, "", [("get_weather", WEATHER_ARGUMENTS)]),
        (
            "Let me see. " + WEATHER + NOOP,
            "Let me see. ",
            [("get_weather", WEATHER_ARGUMENTS), ("noop", "{}")],
        ),
        ("no calls, <tool_c", "no calls, <tool_c", []),
        ("a < b <tool_call> c", "a < b <tool_call> c", []),
        ('<tool_call>{"name": "f g", "arguments": {}}</tool_call>', None, []),
        ('<tool_call>{"name": "", "arguments": {}}</tool_call>', None, []),
        ('<tool_call>{"name": "f", "arguments": {"a": "b', "", [("f", '{"a": "b')]),
        ('<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu', []),
    ],
)
@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_calls_and_content_for_every_split(
    text: str, content: str | None, calls: list[tuple[str, str]], size: int
) -> None:
    parser, outputs = parse_in_pieces(text, size)
    assert parser.content == (text if content is None else content)
    assert [(call.name, call.arguments) for call in parser.calls] == calls
    # What was streamed adds up to what was parsed.
    streamed_content, streamed_arguments = assembled(outputs)
    assert streamed_content == parser.content
    assert streamed_arguments == {i: call.arguments for i, call in enumerate(parser.calls)}


def test_a_call_is_announced_before_its_arguments() -> None:
    parser = ToolCallParser()
    announced = parser.feed('Hi <tool_call>{"name": "noop", "arguments": {')
    assert announced.content == "Hi "
    first, fragment = announced.calls
    assert (first.index, first.name, first.arguments) == (0, "noop", "")
    assert first.id is not None and first.id.startswith("call_")
    assert (fragment.index, fragment.id, fragment.arguments) == (0, None, "{")
    assert parser.feed("}}</tool_call>").calls[0].arguments == "}"
    assert parser.calls[0].arguments == "{}"


def test_held_back_text_is_released_once_it_is_not_a_call() -> None:
    parser = ToolCallParser()
    assert parser.feed("x <tool").content == "x "
    assert parser.feed("box>").content == "<toolbox>"


def test_each_call_gets_its_own_id() -> None:
    parser, _ = parse_in_pieces(NOOP * 3, 7)
    assert len({call.id for call in parser.calls}) == 3


def test_pieces_keep_the_order_of_content_and_calls() -> None:
    parsed = ToolCallParser().feed("Sure. " + NOOP + " Done.")
    kinds = [
        piece if isinstance(piece, str) else (piece.index, piece.arguments)
        for piece in parsed.pieces
    ]
    assert kinds == ["Sure. ", (0, ""), (0, "{}"), " Done."]
    assert parsed.content == "Sure.  Done."
