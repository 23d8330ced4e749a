"""Output items of the Responses API built from generated text, without a model: a message for
text, a function_call per call, whitespace around calls in no item, the same items however the
text is split, and events that rebuild exactly those items."""

import json
from typing import Any

from frontend.output.response_items import OutputItems
from services.tool_format import format_call

CALL = format_call("get_weather", '{"city": "Paris"}')


def build(pieces: list[str], tool_calls: bool = True, status: str = "completed"):
    items = OutputItems(tool_calls)
    events = [event for piece in pieces for event in items.feed(piece)]
    return items.items, events + items.finish(status)


def shape(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Each item's type, status and text or call."""
    return [
        (
            item["type"],
            item["status"],
            item["content"][0]["text"]
            if item["type"] == "message"
            else f"{item['name']}({item['arguments']})",
        )
        for item in items
    ]


def replay(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items as a client assembles them from the events (the openai SDK's way)."""
    items: dict[int, dict[str, Any]] = {}
    for event in events:
        kind, index = event["type"], event.get("output_index")
        if kind == "response.output_item.added":
            items[index] = json.loads(json.dumps(event["item"]))
        elif kind == "response.content_part.added":
            items[index]["content"].append(event["part"])
        elif kind == "response.output_text.delta":
            items[index]["content"][event["content_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            items[index]["arguments"] += event["delta"]
        elif kind == "response.output_item.done":
            assert event["item"]["status"] != "in_progress"
            items[index]["status"] = event["item"]["status"]
            assert items[index] == event["item"]
    return [items[i] for i in sorted(items)]


def test_text_then_a_call() -> None:
    text = f"Let me check.\n{CALL}\n"
    items, events = build([text])
    assert shape(items) == [
        ("message", "completed", "Let me check.\n"),
        ("function_call", "completed", 'get_weather({"city": "Paris"})'),
    ]
    assert replay(events) == items
    split, split_events = build(list(text))
    assert shape(split) == shape(items) and replay(split_events) == split


def test_whitespace_around_calls_is_in_no_item() -> None:
    items, _ = build(["\n ", CALL, "\n", CALL, " \n"])
    assert [item["type"] for item in items] == ["function_call", "function_call"]
    assert items[0]["call_id"] != items[1]["call_id"]


def test_a_reply_without_calls_is_one_message_whitespace_included() -> None:
    items, events = build(["\n", "  Hello", " world"])
    assert shape(items) == [("message", "completed", "\n  Hello world")]
    assert replay(events) == items
    (blank,), _ = build([" "], tool_calls=False)
    assert blank["content"][0]["text"] == " "


def test_a_cut_reply_leaves_its_last_item_incomplete() -> None:
    items, events = build([f"Sure.{CALL[:-20]}"], status="incomplete")
    assert [(item["type"], item["status"]) for item in items] == [
        ("message", "completed"),
        ("function_call", "incomplete"),
    ]
    assert replay(events) == items
    assert events[-1]["type"] == "response.output_item.done"


def test_without_tools_a_call_is_text() -> None:
    items, _ = build([CALL], tool_calls=False)
    assert shape(items) == [("message", "completed", CALL)]
