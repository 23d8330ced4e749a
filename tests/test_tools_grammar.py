"""The "tool_calls" grammar on the real tokenizer: what each mode accepts, and that calls drawn
from random logits always parse into valid calls."""

import json
from typing import Any

import grpc
import jsonschema
import pytest
import torch

from frontend.output.tool_parser import ToolCallParser
from services.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarState,
    tool_calls_spec,
)
from services.engine.grammar_batch import GrammarBatch
from services.engine.tokenizer import Tokenizer
from services.errors import InvalidArgumentError
from services.grammar_wire import grammar_spec
from services.request_params import Grammar
from services.tool_format import format_call
from tests.conftest import VOCAB_SIZE

MAX_TOKENS = 600
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
    "required": ["a"],
}
EMPTY = {"type": "object", "properties": {}}
TOOLS = {"get_weather": WEATHER, "add": ADD, "noop": EMPTY}
PARIS = format_call("get_weather", '{"city": "Paris", "unit": "celsius"}')
NOOP = format_call("noop", "{}")


def source(mode: str, parallel: bool, names: tuple[str, ...] = tuple(TOOLS)) -> str:
    tools = [{"name": name, "parameters": TOOLS[name]} for name in names]
    return json.dumps({"tools": tools, "mode": mode, "parallel": parallel})


def accepts(compiler: GrammarCompiler, tokenizer: Tokenizer, spec: str, text: str) -> bool:
    """Whether `text` followed by the end of the output is a complete match."""
    state = GrammarState(compiler.compile(tool_calls_spec(spec)))
    ids = [*tokenizer.encode(text), tokenizer.eos_token_ids[0]]
    return all(state.accept(token_id) for token_id in ids) and state.is_terminated()


@pytest.mark.parametrize(
    ("mode", "parallel", "text", "expected"),
    [
        ("required", True, PARIS, True),
        ("required", True, PARIS + NOOP + PARIS, True),
        ("required", False, PARIS + NOOP, False),
        ("required", True, "", False),
        ("required", True, "Sure. " + PARIS, False),
        ("required", True, PARIS + " done", False),
        ("required", True, PARIS.replace("celsius", "kelvin"), False),
        ("required", True, PARIS.replace('"unit": "celsius"', '"unit": "celsius", "x": 1'), False),
        ("required", True, format_call("get_weather", '{"city": "Paris"}'), False),
        ("required", True, format_call("unknown", "{}"), False),
        ("auto", True, "The weather is fine.", True),
        ("auto", True, "", True),
        ("auto", True, "Let me check. " + PARIS + NOOP, True),
        ("auto", False, "Let me check. " + PARIS + NOOP, False),
        ("auto", True, PARIS + " and some text", False),
        ("auto", True, "text " + format_call("add", '{"a": 100}'), False),
    ],
)
def test_what_each_mode_accepts(
    compiler: GrammarCompiler,
    tokenizer: Tokenizer,
    mode: str,
    parallel: bool,
    text: str,
    expected: bool,
) -> None:
    assert accepts(compiler, tokenizer, source(mode, parallel), text) == expected


def test_a_named_tool_is_required_over_that_tool_alone(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    named = source("required", False, ("noop",))
    assert accepts(compiler, tokenizer, named, NOOP)
    assert not accepts(compiler, tokenizer, named, PARIS)


def generate(state: GrammarState, batch: GrammarBatch, tokenizer: Tokenizer, seed: int) -> str:
    """Greedy over random logits: the grammar alone decides what comes out. The end of output
    gets a bias, else parallel calls go on and on: after a call it competes with few tokens."""
    generator = torch.Generator().manual_seed(seed)
    token_ids: list[int] = []
    for _ in range(MAX_TOKENS):
        logits = torch.randn(1, VOCAB_SIZE, generator=generator)
        logits[0, tokenizer.eos_token_ids] += 3.0
        token_id = int(batch.apply(logits, [state]).argmax())
        assert state.accept(token_id)
        if state.is_terminated():
            return tokenizer.decode(token_ids)
        token_ids.append(token_id)
    raise AssertionError(f"not terminated after {MAX_TOKENS} tokens")


@pytest.mark.parametrize("parallel", [True, False])
def test_random_logits_always_give_valid_calls(
    compiler: GrammarCompiler, tokenizer: Tokenizer, parallel: bool
) -> None:
    batch = GrammarBatch(VOCAB_SIZE, 1, "cpu")
    compiled = compiler.compile(tool_calls_spec(source("required", parallel)))
    names = set()
    for seed in range(8):
        parser = ToolCallParser()
        parser.feed(generate(GrammarState(compiled), batch, tokenizer, seed))
        parser.finish()
        assert parser.content == ""
        assert parser.calls and (parallel or len(parser.calls) == 1)
        for call in parser.calls:
            jsonschema.validate(json.loads(call.arguments), TOOLS[call.name])
            names.add(call.name)
    assert len(names) > 1  # the grammar does not favour one tool


def test_equal_sources_compile_once(compiler: GrammarCompiler) -> None:
    first = compiler.compile(tool_calls_spec(source("auto", True)))
    spaced = json.dumps(json.loads(source("auto", True)), indent=2)
    assert compiler.compile(tool_calls_spec(spaced)) is first


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"tools": [], "mode": "auto"}, "at least one tool"),
        ({"tools": [{"name": 'a"b', "parameters": EMPTY}]}, "name must match"),
        ({"tools": [{"name": "a", "parameters": EMPTY}] * 2}, "unique"),
        ({"tools": [{"name": "a", "parameters": EMPTY}], "mode": "any"}, "mode must be"),
        ({"tools": [{"name": "a", "parameters": EMPTY}], "parallel": 1}, "parallel"),
        ({"tools": [{"name": "a", "parameters": {"type": "strnig"}}]}, 'Unsupported type "strnig"'),
        ({"tools": [{"name": "a"}]}, "parameters"),
    ],
)
def test_invalid_sources_name_the_problem(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        tool_calls_spec(json.dumps(spec))


def test_wire_errors_name_tools() -> None:
    grammar = Grammar(kind="tool_calls", source="{not json")
    with pytest.raises(InvalidArgumentError, match="^tools: ") as info:
        grammar_spec(grammar)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
