"""Tool calling over HTTP on the real stack with the openai client: every required or named
call is valid against its tool's schema (the grammar, not the 135M model, makes it so), streams
assemble to the same call, and tool results go back into the next prompt."""

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from services.tool_format import format_call


def function(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def text(max_length: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


WEATHER = function(
    "get_weather",
    "The current weather in a city.",
    {"city": text(20), "unit": {"enum": ["celsius", "fahrenheit"]}},
)
CALCULATE = function(
    "calculate",
    "Applies an arithmetic operation to two integers.",
    {
        "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "op": {"enum": ["add", "subtract", "multiply", "divide"]},
    },
)
SEARCH = function("search", "Searches the web.", {"query": text(30)})
EVENT = function(
    "create_event",
    "Adds an event to the calendar.",
    {
        "title": text(20),
        "day": {"type": "integer", "minimum": 1, "maximum": 31},
        "tags": {"type": "array", "items": text(10), "maxItems": 2},
    },
)
TOOLS = [WEATHER, CALCULATE, SEARCH, EVENT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = [
    "What is the weather like in Paris today?",
    "What is 17 times 23?",
    "Find recent news about the Mars rover.",
    "Put lunch with Ana on the 12th in my calendar.",
]


def ask(client, model, question: str, **kwargs):
    messages = [{"role": "user", "content": question}]
    kwargs = {"max_tokens": 256, "temperature": 0.0, **kwargs}
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def assert_valid_calls(message, names: list[str]) -> None:
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def forced_case(i: int) -> dict[str, Any]:
    """Request i of twelve: all tools and "required", or one tool by name; greedy or seeded;
    parallel calls allowed or not."""
    tool = TOOLS[i % len(TOOLS)]
    name = tool["function"]["name"]
    choice = "required" if i < 6 else {"type": "function", "function": {"name": name}}
    sampling = {"temperature": 0.0} if i % 3 == 0 else {"temperature": 1.0, "seed": i}
    return {
        "question": QUESTIONS[i % len(QUESTIONS)],
        "tools": TOOLS if i < 6 else [tool, TOOLS[(i + 1) % len(TOOLS)]],
        "tool_choice": choice,
        "parallel_tool_calls": i % 2 == 0,
        **sampling,
    }


def test_required_and_named_calls_always_validate(client, model) -> None:
    cases = [forced_case(i) for i in range(12)]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: ask(client, model, **case), cases))
    cut = 0
    for case, reply in zip(cases, replies, strict=True):
        choice = reply.choices[0]
        if choice.finish_reason == "length" and case["temperature"] > 0:
            # Nothing bounds a sampled string argument: it may run past max_tokens.
            assert reply.usage.completion_tokens == 256
            cut += 1
            continue
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        if isinstance(case["tool_choice"], dict):
            names = [case["tool_choice"]["function"]["name"]]
        else:
            names = list(SCHEMAS)
        assert_valid_calls(choice.message, names)
        if not case["parallel_tool_calls"]:
            assert len(choice.message.tool_calls) == 1
    assert cut <= 2


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_auto_gives_text_or_a_valid_call(client, model, seed) -> None:
    sampling = {"temperature": 0.0} if seed is None else {"temperature": 1.0, "seed": seed}
    reply = ask(client, model, QUESTIONS[0], tools=TOOLS, max_tokens=48, **sampling)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason in ("tool_calls", "length")
        assert_valid_calls(choice.message, list(SCHEMAS))
    else:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content


def test_stream_assembles_the_same_call(client, model) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    fields = {"tools": TOOLS, "tool_choice": named}
    whole = ask(client, model, QUESTIONS[0], **fields).choices[0].message
    (call,) = whole.tool_calls
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    with client.chat.completions.stream(
        model=model, messages=messages, max_tokens=256, temperature=0.0, **fields
    ) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    (streamed_call,) = streamed.message.tool_calls
    assert streamed_call.function.name == call.function.name
    assert streamed_call.function.arguments == call.function.arguments


def test_tool_result_renders_into_the_next_prompt(client, model) -> None:
    fields = {"tools": [WEATHER], "tool_choice": "required", "extra_body": {"raw_output": True}}
    first = ask(client, model, QUESTIONS[0], **fields)
    (call,) = first.choices[0].message.tool_calls
    messages = [
        {"role": "user", "content": QUESTIONS[0]},
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
    ]
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=[WEATHER],
        max_tokens=24,
        temperature=0.0,
        extra_body={"raw_output": True},
    )
    prompt = reply.choices[0].model_extra["raw_output"]["prompt_fragments"][0]
    assert format_call("get_weather", call.function.arguments) in prompt
    # SmolLM2's ChatML template writes roles as given: the result is a "tool" turn.
    assert "<|im_start|>tool\n22 degrees and sunny<|im_end|>\n<|im_start|>assistant\n" in prompt
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_schema_the_grammar_cannot_enforce_is_a_400_naming_tools(client, model) -> None:
    bad = function("f", "Broken.", {"x": {"type": "strnig"}})
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, model, "Hi", tools=[bad], tool_choice="required")
    assert err.value.body["param"] == "tools"
    assert "strnig" in err.value.body["message"]
