"""The Responses API (`/v1/responses`) through the openai client on one real stack that stores
responses and has two API keys: the same prompts and greedy replies as the chat endpoint given the
same conversation, structured output and tool calls, the stream events, stored responses per key,
and 400s naming the field. Storing switched off is checked on a frontend over fake stages."""

import json
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from tests.conftest import start_stack
from tests.test_frontend_fake_stages import MODEL_ID

KEYS = ("key-a", "key-b")
QUESTION = "What is the capital of France?"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": WEATHER_PARAMETERS,
}
CHAT_WEATHER = {
    "type": "function",
    "function": {key: WEATHER[key] for key in ("name", "description", "parameters")},
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
CALL_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)


@pytest.fixture(scope="module")
def stack():
    stack = start_stack(
        f"--frontend-args=--store-responses 8 --api-key {KEYS[0]} --api-key {KEYS[1]}"
    )
    yield stack
    stack.stop()


def client_for(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return client_for(stack, KEYS[0])


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def respond(client, model, input: Any, **kwargs: Any):
    kwargs = {"max_output_tokens": 40, "temperature": 0.0, **kwargs}
    return client.responses.create(model=model, input=input, **kwargs)


def chat(client, model, messages: list[dict[str, Any]], **kwargs: Any):
    kwargs = {"max_tokens": 40, "temperature": 0.0, **kwargs}
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def assert_same_as_chat(response, reply) -> None:
    """The same prompt (token for token) and the same greedy reply as the chat endpoint."""
    assert response.usage.input_tokens == reply.usage.prompt_tokens
    assert response.output_text == reply.choices[0].message.content
    assert response.usage.output_tokens == reply.usage.completion_tokens


def test_string_input_is_a_user_message(client, model) -> None:
    raw = client.responses.with_raw_response.create(
        model=model, input=QUESTION, max_output_tokens=40, temperature=0.0
    )
    response = raw.parse()
    assert int(raw.headers["fireworks-prompt-tokens"]) == response.usage.input_tokens
    assert "fireworks-server-time-to-first-token" in raw.headers
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.incomplete_details is None
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.status == "completed" and message.content[0].type == "output_text"
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens >= 0
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.0, 1.0, 40)
    assert response.tool_choice == "auto" and response.tools == []
    assert response.text.format.type == "text" and response.parallel_tool_calls
    assert_same_as_chat(response, chat(client, model, [{"role": "user", "content": QUESTION}]))


def test_messages_with_instructions(client, model) -> None:
    response = respond(
        client,
        model,
        [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "input_text", "text": "Name a planet."}]},
            {"role": "assistant", "content": "Mars."},
            {"type": "message", "role": "user", "content": "Another one?"},
        ],
        instructions="You are a helpful astronomer.",
        metadata={"case": "instructions"},
        user="tester",
    )
    assert response.instructions == "You are a helpful astronomer."
    assert response.metadata == {"case": "instructions"} and response.user == "tester"
    messages = [
        {"role": "system", "content": "You are a helpful astronomer."},
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": "Mars."},
        {"role": "user", "content": "Another one?"},
    ]
    assert_same_as_chat(response, chat(client, model, messages))


def test_max_output_tokens_makes_it_incomplete(client, model) -> None:
    response = respond(client, model, "Write a long story about a dragon.", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5
    assert response.output[0].status == "incomplete" and response.output_text


def test_json_schema_text_format(client, model) -> None:
    response = client.responses.parse(
        model=model,
        input="Name a city and its country.",
        text_format=City,
        max_output_tokens=80,
        temperature=0.0,
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, City)
    assert response.text.format.type == "json_schema" and response.text.format.strict
    jsonschema.validate(json.loads(response.output_text), City.model_json_schema())


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_required_tool_call_validates(client, model, choice) -> None:
    search = {"type": "function", "name": "search", "parameters": {"type": "object"}}
    response = respond(
        client,
        model,
        "What is the weather like in Paris?",
        tools=[WEATHER, search],
        tool_choice=choice,
        parallel_tool_calls=False,
        max_output_tokens=100,
    )
    assert response.status == "completed" and response.tool_choice is not None
    (call,) = response.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    if isinstance(choice, dict):
        assert call.name == "get_weather"
    if call.name == "get_weather":
        jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    assert [tool.name for tool in response.tools] == ["get_weather", "search"]


def test_tool_round_trip_is_the_chat_conversation(client, model) -> None:
    question = {"role": "user", "content": "What is the weather like in Paris?"}
    first = respond(
        client, model, [question], tools=[WEATHER], tool_choice="required", max_output_tokens=100
    )
    (call,) = first.output
    result = json.dumps({"temperature": 22, "sky": "sunny"})
    output = {"type": "function_call_output", "call_id": call.call_id, "output": result}
    response = respond(client, model, [question, *first.output, output], tools=[WEATHER])
    tool_call = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    messages = [
        question,
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": result},
    ]
    assert response.usage.input_tokens > first.usage.input_tokens
    assert_same_as_chat(response, chat(client, model, messages, tools=[CHAT_WEATHER]))


def test_stream_events(client, model) -> None:
    whole = respond(client, model, QUESTION)
    events = list(respond(client, model, QUESTION, stream=True))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    assert list(dict.fromkeys(kinds)) == TEXT_EVENTS
    created, completed = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    assert created.id == completed.id != whole.id
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text == completed.output_text
    assert completed.usage.output_tokens == whole.usage.output_tokens
    assert completed.usage.total_tokens == whole.usage.total_tokens
    done = next(event for event in events if event.type == "response.output_item.done")
    assert done.item.model_dump() == completed.output[0].model_dump()


def test_stream_helper_and_incomplete_stream(client, model) -> None:
    with client.responses.stream(
        model=model, input=QUESTION, max_output_tokens=40, temperature=0.0
    ) as stream:
        text = "".join(
            event.delta for event in stream if event.type == "response.output_text.delta"
        )
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text
    events = list(respond(client, model, QUESTION, stream=True, max_output_tokens=3))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 3


def test_stream_with_tools(client, model) -> None:
    fields = {"tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 100}
    (whole,) = respond(client, model, "Weather in Rome?", **fields).output
    events = list(respond(client, model, "Weather in Rome?", stream=True, **fields))
    assert list(dict.fromkeys(event.type for event in events)) == CALL_EVENTS
    added = next(event for event in events if event.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.arguments == ""
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert "".join(deltas) == done.arguments == whole.arguments
    with client.responses.stream(
        model=model, input="Weather in Rome?", temperature=0.0, **fields
    ) as stream:
        (call,) = stream.get_final_response().output
    assert (call.name, call.arguments) == (whole.name, whole.arguments)
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)


def test_previous_response_continues_the_conversation(client, model) -> None:
    first = respond(client, model, "My name is Ana.", max_output_tokens=20)
    assert first.store
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = respond(client, model, "What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    messages = [
        {"role": "user", "content": "My name is Ana."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert_same_as_chat(second, chat(client, model, messages))
    assert second.usage.input_tokens_details.cached_tokens > 0
    third = respond(client, model, "Thanks.", previous_response_id=second.id, max_output_tokens=8)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_streamed_responses_are_stored_too(client, model) -> None:
    with client.responses.stream(
        model=model, input="Hi!", max_output_tokens=40, temperature=0.0
    ) as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_store_false_is_not_kept(client, model) -> None:
    response = respond(client, model, "Hi!", store=False, max_output_tokens=4)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_each_key_sees_only_its_own_responses(stack, client, model) -> None:
    response = respond(client, model, "A secret.", max_output_tokens=4)
    other = client_for(stack, KEYS[1])
    with pytest.raises(openai.NotFoundError) as err:
        other.responses.retrieve(response.id)
    assert err.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        respond(other, model, "Go on.", previous_response_id=response.id)
    assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.AuthenticationError):
        client_for(stack, "wrong-key").responses.retrieve(response.id)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": True}, "background"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
            "tools.0.parameters",
        ),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0",
        ),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
        ({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning.summary"),
        ({"text": {"format": {"type": "grammar", "grammar": 'root ::= "a"'}}}, "text.format"),
        (
            {
                "text": {
                    "format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}
                }
            },
            "text.format",
        ),
        ({"text": {"format": {"type": "json_object"}}, "tools": [WEATHER]}, "text.format"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"metadata": {"key": 1}}, "metadata.key"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ],
)
def test_unsupported_or_invalid_fields_are_400s_naming_them(client, model, fields, param) -> None:
    body = {"model": model, "input": "Hi", **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/responses", body=body, cast_to=object)
    assert err.value.body["param"] == param, err.value.body


def test_reasoning_effort_is_accepted(client, model) -> None:
    response = respond(client, model, "Hi", reasoning={"effort": "low"}, max_output_tokens=4)
    assert response.reasoning.effort == "low"


@pytest.fixture(scope="module")
def unstored(fake_client) -> openai.OpenAI:
    """The openai client on a frontend (over fake stages) that stores no responses."""
    return openai.OpenAI(
        base_url=f"{fake_client.base_url}/v1",
        api_key="unused",
        http_client=fake_client,
        max_retries=0,
    )


def test_without_storing_store_and_previous_response_are_400s(unstored) -> None:
    response = unstored.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=3)
    assert response.store is False
    unstored.responses.create(model=MODEL_ID, input="Hi", store=False, max_output_tokens=3)
    with pytest.raises(openai.BadRequestError) as err:
        unstored.responses.create(model=MODEL_ID, input="Hi", store=True)
    assert err.value.body["param"] == "store"
    assert "--store-responses" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        unstored.responses.create(model=MODEL_ID, input="Hi", previous_response_id=response.id)
    assert err.value.body["param"] == "previous_response_id"
    assert "--store-responses" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        unstored.responses.retrieve(response.id)
