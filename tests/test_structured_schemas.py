"""Structured output across many JSON schemas and request shapes, over HTTP with the openai client.

Fifty requests run concurrently (several constrained rows in each decode step) over thirteen
schemas, both response_format forms, both endpoints, streaming and not, greedy and seeded
sampling, some with n=2. Every choice must finish and validate: the grammar, not the 135M
model, is what makes the output right.
"""

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import openai
import pytest

NUM_REQUESTS = 50
MAX_IN_FLIGHT = 12
MAX_TOKENS = 200
BOOLEAN = {"type": "boolean"}


def text(max_length: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


def pattern(regex: str) -> dict[str, Any]:
    return {"type": "string", "pattern": regex}


def integer(minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def array(items: dict[str, Any], min_items: int, max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """A closed object, so that even the non-strict form cannot add unbounded properties."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "contact": obj(
        {
            "name": text(24),
            "address": obj({"street": text(32), "city": text(20), "zip": pattern("^[0-9]{5}$")}),
        }
    ),
    "tags": obj({"tags": array(text(12), 1, 4)}),
    "enums": obj(
        {
            "status": {"enum": ["active", "inactive", "pending"]},
            "priority": {"type": "integer", "enum": [1, 2, 3]},
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
        }
    ),
    "dates": obj({"year": integer(1900, 2100), "month": integer(1, 12), "offset": integer(-5, 5)}),
    "codes": obj(
        {
            "sku": pattern("^[A-Z]{3}-[0-9]{4}$"),
            "email": pattern("^[a-z]{1,12}@[a-z]{1,10}\\.(com|org)$"),
            "hex": pattern("^#[0-9a-f]{6}$"),
        }
    ),
    "flags": obj({"done": BOOLEAN, "visible": BOOLEAN, "note": text(16)}, ["done", "visible"]),
    "nullable": obj(
        {
            "nickname": {"type": ["string", "null"], "maxLength": 16},
            "age": {"type": ["integer", "null"], "minimum": 0, "maximum": 120},
            "manager": {"anyOf": [obj({"id": integer(1, 999)}), {"type": "null"}]},
        }
    ),
    "measure": obj(
        {"value": {"anyOf": [text(10), integer(0, 99), BOOLEAN]}, "unit": {"enum": ["kg", "m"]}}
    ),
    "order": obj(
        {
            "id": integer(1, 99999),
            "lines": array(obj({"product": text(16), "quantity": integer(1, 9)}), 1, 3),
            "paid": BOOLEAN,
        }
    ),
    "place": obj(
        {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
        }
    ),
    "deep": obj({"a": obj({"b": obj({"c": obj({"flag": BOOLEAN, "depth": integer(0, 9)})})})}),
    "grid": obj({"rows": array(array(integer(0, 9), 2, 3), 2, 2)}),
    "survey": obj(
        {"answers": array({"enum": ["yes", "no", "maybe"]}, 2, 5), "score": integer(0, 10)},
        ["answers"],
    ),
}
# 13 schemas against a 16-shape cycle: each use of a schema comes in another shape.
SHAPES = list(
    itertools.product(("openai", "fireworks"), ("chat", "completions"), (False, True), (0.0, 1.0))
)


@dataclass(slots=True)
class Case:
    index: int
    name: str
    form: str
    endpoint: str
    stream: bool
    temperature: float
    n: int

    def response_format(self) -> dict[str, Any]:
        schema = SCHEMAS[self.name]
        if self.form == "openai":
            spec = {"name": self.name, "schema": schema, "strict": True}
            return {"type": "json_schema", "json_schema": spec}
        return {"type": "json_object", "schema": schema}


@dataclass(slots=True)
class Outcome:
    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)

    def add(self, choice: Any, piece: str | None) -> None:
        self.texts[choice.index] = self.texts.get(choice.index, "") + (piece or "")
        if choice.finish_reason is not None:
            self.finish_reasons[choice.index] = choice.finish_reason


CASES = [
    Case(i, list(SCHEMAS)[i % len(SCHEMAS)], *SHAPES[i % len(SHAPES)], n=2 if i % 7 == 3 else 1)
    for i in range(NUM_REQUESTS)
]


async def run_case(client: openai.AsyncOpenAI, model: str, case: Case) -> Outcome:
    body: dict[str, Any] = {"response_format": case.response_format()}
    if case.temperature > 0:
        body["seed"] = case.index
    args = dict(model=model, max_tokens=MAX_TOKENS, temperature=case.temperature, n=case.n)
    args.update(stream=case.stream, extra_body=body)
    if case.endpoint == "chat":
        content = f"Reply with a JSON object describing a {case.name} record."
        messages = [{"role": "user", "content": content}]
        reply = await client.chat.completions.create(messages=messages, **args)
    else:
        prompt = f"A JSON object describing a {case.name} record:\n"
        reply = await client.completions.create(prompt=prompt, **args)
    outcome = Outcome()
    for chunk in [c async for c in reply] if case.stream else [reply]:
        for choice in chunk.choices:
            if case.endpoint == "completions":
                outcome.add(choice, choice.text)
            else:
                outcome.add(choice, (choice.delta if case.stream else choice.message).content)
    return outcome


async def run_all(base_url: str, model: str) -> list[Outcome]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def bounded(case: Case) -> Outcome:
        async with in_flight:
            return await run_case(client, model, case)

    try:
        return await asyncio.gather(*(bounded(case) for case in CASES))
    finally:
        await client.close()


@pytest.fixture(scope="module")
def outcomes(stack, model) -> list[Outcome]:
    return asyncio.run(run_all(f"{stack.http_url}/v1", model))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.index}-{c.name}-{c.form}-{c.endpoint}")
def test_every_choice_finishes_and_validates(outcomes, case):
    outcome = outcomes[case.index]
    assert sorted(outcome.texts) == list(range(case.n))
    for index in range(case.n):
        assert outcome.finish_reasons[index] == "stop", outcome.texts[index]
        jsonschema.validate(json.loads(outcome.texts[index]), SCHEMAS[case.name])


@pytest.mark.parametrize("stream", [False, True])
def test_too_few_tokens_for_the_object_ends_with_length(client, model, stream):
    response_format = {"type": "json_object", "schema": SCHEMAS["order"]}
    reply = client.completions.create(
        model=model,
        prompt="An order as JSON:\n",
        max_tokens=6,
        temperature=0,
        stream=stream,
        extra_body={"response_format": response_format},
    )
    choices = [c for chunk in (reply if stream else [reply]) for c in chunk.choices]
    assert choices[-1].finish_reason == "length"
    cut_off = "".join(c.text for c in choices)
    assert cut_off.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut_off)


def token_id(client, model, piece: str) -> int:
    reply = client.completions.create(
        model=model, prompt=piece, max_tokens=1, extra_body={"return_token_ids": True}
    )
    (token,) = reply.choices[0].prompt_token_ids
    return token


def enum_request(client, model, **body):
    """The enums schema leaves no free text, so a word such as "Hello" is never allowed."""
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say Hello, then give a status as JSON."}],
        extra_body={"max_tokens": MAX_TOKENS, "return_token_ids": True, **body},
    ).choices[0]


def test_a_large_bias_wins_without_a_grammar(client, model):
    hello = token_id(client, model, "Hello")
    choice = enum_request(client, model, max_tokens=3, temperature=0, logit_bias={hello: 100})
    assert choice.token_ids == [hello] * 3


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0},
        {"temperature": 1.0, "seed": 1, "top_k": 5},
        {"temperature": 1.0, "seed": 2, "top_p": 0.8, "min_p": 0.05},
        {"temperature": 0.8, "seed": 3, "repetition_penalty": 1.5},
        {"temperature": 1.0, "seed": 4, "frequency_penalty": 1.5, "presence_penalty": -2.0},
        {"temperature": 1.5, "seed": 5, "top_k": 40, "top_p": 0.95, "min_p": 0.1},
    ],
)
def test_grammar_holds_with_sampling_and_a_bias_towards_a_forbidden_token(client, model, sampling):
    hello, brace = token_id(client, model, "Hello"), token_id(client, model, "{")
    # +100 on a token the grammar forbids everywhere, -100 on one it needs first.
    choice = enum_request(
        client,
        model,
        logit_bias={hello: 100, brace: -100},
        response_format={"type": "json_object", "schema": SCHEMAS["enums"]},
        **sampling,
    )
    assert choice.finish_reason == "stop"
    assert hello not in choice.token_ids
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS["enums"])


INVALID = [
    ("chat", False, "json_schema", obj({"n": integer(10, 1)}), "minimum greater than maximum"),
    ("completions", False, "json_object", obj({"s": pattern("[a-")}), "Unclosed '['"),
    ("chat", True, "json_object", array(BOOLEAN, 3, 1), "minItems is greater than maxItems"),
]


@pytest.mark.parametrize(("endpoint", "stream", "form", "schema", "reason"), INVALID)
def test_invalid_schemas_are_a_400_saying_what_is_wrong(
    client, model, endpoint, stream, form, schema, reason
):
    if form == "json_schema":
        response_format = {"type": form, "json_schema": {"name": "bad", "schema": schema}}
    else:
        response_format = {"type": form, "schema": schema}
    args = {"model": model, "stream": stream, "extra_body": {"response_format": response_format}}
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **args)
        else:
            client.completions.create(prompt="Hi", **args)
    assert err.value.body["param"] == "response_format"
    assert err.value.body["message"].startswith("response_format: invalid JSON schema: ")
    assert reason in err.value.body["message"]
