"""Grammar-constrained decoding through prefill and decode over gRPC, with the real model.

Every output must parse and validate against its schema, even from a 135M model, because
only tokens the grammar allows are ever sampled (the first one in prefill too).
"""

import json

import grpc
import jsonschema
import pytest

from services.engine.tokenizer import Tokenizer
from services.rpc import common_pb2, decode_pb2
from tests.grpc_stack import Stack, rpc_error

pytest_plugins = ["tests.grpc_fixtures"]

UNBOUNDED = 0  # the index of the schema with a string of no maximum length
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        },
        "required": ["city", "population"],
    },
    {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["colors"],
    },
    {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "age": {"type": "number", "minimum": 0, "maximum": 150},
                    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
                },
                "required": ["age", "email"],
            }
        },
        "required": ["person"],
    },
]


@pytest.fixture(scope="module")
def stack(services_stack: Stack) -> Stack:
    return services_stack


def chat_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    rendered = tokenizer.render_chat([{"role": "user", "content": text}], True)
    return tokenizer.encode(rendered)


def constrained(kind: str, source: str = "", temperature: float = 0.0, seed: int = 0):
    return common_pb2.SamplingParams(
        temperature=temperature,
        seed=seed,
        grammar=common_pb2.Grammar(kind=kind, source=source, strict=True),
    )


def generate_text(stack: Stack, prompt: list[int], sampling, max_tokens: int = 96):
    responses = stack.generate(prompt, max_tokens, sampling=sampling)
    return "".join(r.text for r in responses), responses[-1].finish_reason


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_validate_against_their_schema(stack, default_tokenizer, index, temperature):
    schema = SCHEMAS[index]
    prompt = chat_prompt(default_tokenizer, "Describe something as JSON.")
    sampling = constrained("json_schema", json.dumps(schema), temperature, seed=index)
    text, finish = generate_text(stack, prompt, sampling)
    if index == UNBOUNDED:  # the string may run on until the budget closes the document
        assert finish in (decode_pb2.FINISH_REASON_STOP, decode_pb2.FINISH_REASON_LENGTH), text
    else:
        assert finish == decode_pb2.FINISH_REASON_STOP, text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_gives_an_object(stack, default_tokenizer):
    prompt = chat_prompt(default_tokenizer, "Give me a JSON object about cats.")
    text, finish = generate_text(stack, prompt, constrained("json_object"))
    # Free-form objects may run to max_tokens; a finished one must parse as an object.
    assert text.lstrip().startswith("{")
    if finish == decode_pb2.FINISH_REASON_STOP:
        assert isinstance(json.loads(text), dict)


def test_grammar_constrains_the_first_token_in_prefill(stack, default_tokenizer):
    prompt = chat_prompt(default_tokenizer, "Say hello.")
    prefilled = stack.run_prefill(prompt, constrained("regex", "(yes|no)"))
    assert default_tokenizer.decode([prefilled.first_token_id]) in ("y", "ye", "yes", "n", "no")


def test_cut_off_output_ends_with_length(stack, default_tokenizer):
    prompt = chat_prompt(default_tokenizer, "List many fruits as JSON.")
    schema = {
        "type": "object",
        "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
        "required": ["fruits"],
    }
    _, finish = generate_text(stack, prompt, constrained("json_schema", json.dumps(schema)), 4)
    assert finish == decode_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("kind", "source"),
    [("json_schema", '{"type": "strnig"}'), ("json_schema", "{not json"), ("gbnf", "root ::= x")],
)
def test_invalid_grammars_are_rejected_by_name(stack, default_tokenizer, kind, source):
    prompt = chat_prompt(default_tokenizer, "Hi")
    error = rpc_error(stack.run_prefill, prompt, constrained(kind, source))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("response_format:")
