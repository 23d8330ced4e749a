"""Structured output over HTTP with the official clients: JSON mode, schemas and grammars."""

import json

import jsonschema
import openai
import pydantic
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
}


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population: int = pydantic.Field(ge=0, le=10**9)


def ask(client, model, temperature: float = 0.0, **kwargs):
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=256, temperature=temperature, **kwargs
    )


def test_json_schema_openai_form(client, model):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    choice = ask(client, model, response_format=response_format).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_with_schema_fireworks_form_streams(client, model):
    response_format = {"type": "json_object", "schema": PERSON}
    chunks = ask(client, model, response_format=response_format, stream=True, seed=3)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_each_of_n_choices_is_constrained(client, model):
    # No properties beyond PERSON's, all of them bounded: the grammar ends every choice in time.
    closed = PERSON | {"additionalProperties": False}
    response_format = {"type": "json_object", "schema": closed}
    reply = ask(client, model, response_format=response_format, n=2, temperature=1.0, seed=5)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), closed)


def test_grammar_form(client, model):
    grammar = 'root ::= "yes" | "no"'
    reply = ask(
        client, model, extra_body={"response_format": {"type": "grammar", "grammar": grammar}}
    )
    assert reply.choices[0].message.content in ("yes", "no")


def test_parse_helper_with_a_pydantic_model(client, model):
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    completion = client.chat.completions.parse(
        model=model, messages=messages, response_format=City, max_tokens=256, temperature=0
    )
    city = completion.choices[0].message.parsed
    assert isinstance(city, City)


def test_invalid_schema_is_a_400_naming_response_format(client, model):
    response_format = {"type": "json_object", "schema": {"type": "strnig"}}
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, model, response_format=response_format)
    assert err.value.body["param"] == "response_format"
    assert "strnig" in err.value.body["message"]


UNBOUNDED_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "bio": {"type": "string"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "street": {"type": "string"}},
            "required": ["city", "street"],
        },
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "bio", "address", "hobbies"],
}


@pytest.mark.parametrize("max_tokens", [30, 60])
def test_unbounded_strings_still_parse_when_the_budget_runs_out(client, model, max_tokens):
    messages = [{"role": "user", "content": "A person as JSON."}]
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=1.0,
        n=4,
        seed=11,
        response_format={"type": "json_object", "schema": UNBOUNDED_PERSON},
    )
    assert reply.usage.completion_tokens <= 4 * max_tokens
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), UNBOUNDED_PERSON)
    assert "length" in {choice.finish_reason for choice in reply.choices}
