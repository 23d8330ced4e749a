"""Tools in the frontend, against the fake stages with a decode that plays a script: the grammar
and tools sent to the stages, tool calls parsed into whole and streamed responses, validation."""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from services.rpc import decode_pb2
from services.tool_format import call_prefix
from tests.sse import sse_events
from tests.test_frontend_fake_stages import (
    MODEL_ID,
    FakeDecode,
    FakeStages,
    fake_config,
    start_fake_stages,
)

CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop"}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa}ris"}}</tool_call>'
TWO_CALLS = CALL + '<tool_call>{"name": "noop", "arguments": {}}</tool_call>'
WEATHER_CALL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
CALLS = [{"id": "c", "type": "function", "function": WEATHER_CALL}]


@dataclass
class ScriptedDecode(FakeDecode):
    """Plays `script` (the text, `piece` characters per message, cut to `limit` messages)
    instead of the alphabet; the context window of the fakes is too small for max_tokens."""

    script: str = "plain text"
    piece: int = 3
    limit: int = 10**6

    def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        self.requests.append(request)
        pieces = [self.script[i : i + self.piece] for i in range(0, len(self.script), self.piece)]
        for i, piece in enumerate(pieces[: self.limit]):
            finish = decode_pb2.FINISH_REASON_UNSPECIFIED
            if i + 1 == len(pieces):
                finish = decode_pb2.FINISH_REASON_STOP
            elif i + 1 == self.limit:
                finish = decode_pb2.FINISH_REASON_LENGTH
            yield decode_pb2.GenerateResponse(
                token_ids=[ord("a")], text=piece, finish_reason=finish, num_generated=i + 1
            )
            if finish:
                return


@dataclass
class Env:
    client: TestClient
    fakes: FakeStages
    decode: ScriptedDecode = field(init=False)

    def __post_init__(self) -> None:
        assert isinstance(self.fakes.decode, ScriptedDecode)
        self.decode = self.fakes.decode


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with mock.patch("tests.test_frontend_fake_stages.FakeDecode", ScriptedDecode):
        fakes = start_fake_stages()
    try:
        with TestClient(create_app(fake_config(fakes))) as client:
            yield Env(client, fakes)
    finally:
        fakes.stop()


def chat(
    env: Env, script: str, piece: int = 3, limit: int = 10**6, **fields: Any
) -> dict[str, Any]:
    env.decode.script, env.decode.piece, env.decode.limit = script, piece, limit
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = env.client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    if not fields.get("stream"):
        return response.json()
    return {"events": sse_events(response.text)}


def sent_grammar(env: Env) -> dict[str, Any] | None:
    grammar = env.fakes.prefill.requests[-1].sampling.grammar
    assert env.decode.requests[-1].sampling.grammar == grammar
    return json.loads(grammar.source) if grammar.kind == "tool_calls" else None


def test_required_call_becomes_message_tool_calls(env: Env) -> None:
    reply = chat(env, CALL, tools=[WEATHER, NOOP], tool_choice="required")
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Pa}ris"}'}
    parameters = WEATHER["function"]["parameters"]  # type: ignore[index]
    assert sent_grammar(env) == {
        "tools": [
            {"name": "get_weather", "parameters": parameters},
            {"name": "noop", "parameters": {"type": "object", "properties": {}}},
        ],
        "mode": "required",
        "parallel": True,
    }
    listed = json.loads(env.fakes.tokenizer.renders[-1].tools_json)
    assert [tool["function"]["name"] for tool in listed] == ["get_weather", "noop"]


def test_named_function_and_no_parallel_calls(env: Env) -> None:
    choice = {"type": "function", "function": {"name": "noop"}}
    chat(env, CALL, tools=[WEATHER, NOOP], tool_choice=choice, parallel_tool_calls=False)
    grammar = sent_grammar(env)
    assert grammar is not None
    assert [t["name"] for t in grammar["tools"]] == ["noop"]
    assert (grammar["mode"], grammar["parallel"]) == ("required", False)


def test_auto_text_then_calls(env: Env) -> None:
    reply = chat(env, "Let me check. " + TWO_CALLS, tools=[WEATHER, NOOP])
    message = reply["choices"][0]["message"]
    assert message["content"] == "Let me check. "
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "noop"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    assert sent_grammar(env)["mode"] == "auto"  # type: ignore[index]


def test_auto_plain_text_is_content(env: Env) -> None:
    choice = chat(env, "No tools needed <tool_c", tools=[WEATHER])["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "No tools needed <tool_c"}
    assert choice["finish_reason"] == "stop"


def test_tool_choice_none_sends_no_tools_and_parses_nothing(env: Env) -> None:
    choice = chat(env, CALL, tools=[WEATHER], tool_choice="none")["choices"][0]
    assert choice["message"]["content"] == CALL
    assert sent_grammar(env) is None
    assert env.fakes.tokenizer.renders[-1].tools_json == ""


def test_call_cut_short_keeps_length(env: Env) -> None:
    choice = chat(env, CALL, 1, limit=60, tools=[WEATHER])["choices"][0]
    assert choice["finish_reason"] == "length"
    (call,) = choice["message"]["tool_calls"]
    arguments = CALL[len(call_prefix("get_weather")) : 60]  # unfinished JSON, as generated
    assert call["function"] == {"name": "get_weather", "arguments": arguments}
    # Cut before the name is complete: no call, the text is content.
    choice = chat(env, CALL, 1, limit=20, tools=[WEATHER])["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": CALL[:20]}


def stream_calls(events: list[dict[str, Any]], index: int = 0) -> tuple[str, list[dict]]:
    """Content and calls assembled from the stream of choice `index`, as clients do."""
    content, calls = "", []
    for event in events:
        (choice,) = event["choices"]
        if choice["index"] != index:
            continue
        delta = choice["delta"]
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] == len(calls) and call["function"]["arguments"] == ""
                calls.append({"id": call["id"], "type": call["type"], "function": call["function"]})
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("piece", [1, 4, 200])
def test_stream_assembles_the_whole_response(env: Env, piece: int) -> None:
    script = "Sure. " + TWO_CALLS
    whole = chat(env, script, piece, tools=[WEATHER, NOOP])["choices"][0]
    events = chat(env, script, piece, tools=[WEATHER, NOOP], stream=True)["events"]
    content, calls = stream_calls(events)
    assert content == whole["message"]["content"]
    strip = [{**c, "id": ""} for c in calls]
    assert strip == [{**c, "id": ""} for c in whole["message"]["tool_calls"]]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # No content delta ever shows a piece of a call block.
    assert all("<" not in (e["choices"][0]["delta"].get("content") or "") for e in events)


def test_stream_flushes_held_back_text(env: Env) -> None:
    events = chat(env, "a <tool_c", 1, tools=[WEATHER], stream=True)["events"]
    assert stream_calls(events) == ("a <tool_c", [])
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_each_of_n_choices(env: Env) -> None:
    events = chat(env, CALL, 5, n=2, tools=[WEATHER], stream=True)["events"]
    for index in (0, 1):
        content, calls = stream_calls(events, index)
        assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"]
    finishes = [e["choices"][0] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted((c["index"], c["finish_reason"]) for c in finishes) == [
        (0, "tool_calls"),
        (1, "tool_calls"),
    ]


def test_messages_with_calls_and_results_reach_the_tokenizer(env: Env) -> None:
    call = {"id": "call_1", "type": "function", "function": WEATHER_CALL}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "22 C", "tool_call_id": "call_1"},
    ]
    chat(env, "It is 22 C.", messages=messages, tools=[WEATHER])
    sent = env.fakes.tokenizer.renders[-1].messages
    assert json.loads(sent[1].tool_calls_json) == [call]
    assert (sent[2].role, sent[2].content, sent[2].tool_call_id) == ("tool", "22 C", "call_1")


def _tool(name: str = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


def _sent_as(role: str, **message: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, **message}]}


DICT_ARGUMENTS = [{**CALLS[0], "function": {"name": "f", "arguments": {}}}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools.0.type"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [_tool("a" * 65)]}, "tools.0.function.name"),
        ({"tools": [_tool("bad.name")]}, "tools.0.function.name"),
        ({"tools": [_tool(parameters={"type": "string"})]}, "tools.0.function.parameters"),
        ({"tools": [_tool(parameters=[])]}, "tools.0.function.parameters"),
        ({"tools": [_tool(), _tool()]}, "tools"),
        ({"tools": [_tool()], "tool_choice": "any"}, "tool_choice"),
        ({"tools": [_tool()], "tool_choice": {"type": "function", "function": {}}}, "tool_choice"),
        (
            {"tools": [_tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [_tool()], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [_tool()], "response_format": {"type": "json_object"}}, "response_format"),
        (_sent_as("user", content="x", tool_calls=[]), None),
        (_sent_as("user", content="x", tool_calls=CALLS), "messages.0.tool_calls"),
        (_sent_as("assistant", tool_calls=[{"id": "c"}]), "messages.0.tool_calls"),
        (_sent_as("assistant", tool_calls=DICT_ARGUMENTS), "messages.0.tool_calls"),
    ],
)
def test_tool_fields_are_checked(env: Env, fields: dict[str, Any], param: str | None) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = env.client.post(CHAT, json=body)
    if param is None:  # valid for the frontend
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if param == "response_format":
        assert "cannot be combined with tools" in error["message"]


def test_completions_refuse_tools(env: Env) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "tools": [WEATHER]}
    response = env.client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools"
