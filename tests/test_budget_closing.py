"""Constrained output finished within its token budget, on the real tokenizer: whatever the
logits, a document whose shortest completion fits the budget when generation starts parses."""

import json

import jsonschema
import pytest
import torch

from services.decode.closing import BudgetCloser, short_completion
from services.engine.grammar import GrammarCompiler, GrammarState, json_schema_spec
from services.engine.grammar_batch import GrammarBatch
from services.engine.tokenizer import Tokenizer
from tests.conftest import VOCAB_SIZE

TEXT = {"type": "string"}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props)}


# Unbounded strings, arrays and numbers, and nesting: random logits never end these in time.
SCHEMAS = [
    _obj({"name": TEXT, "bio": TEXT}),
    _obj({"items": {"type": "array", "items": _obj({"t": TEXT, "n": {"type": "integer"}})}}),
    _obj({"a": _obj({"b": _obj({"c": TEXT})})}),
    {"type": "array", "items": TEXT},
    _obj({"x": {"type": "number"}, "y": TEXT}, required=["x"]),
    _obj({"when": {"type": "string", "format": "date"}, "tags": {"type": "array", "items": TEXT}}),
]


def _generate(
    state: GrammarState, tokenizer: Tokenizer, max_tokens: int, seed: int
) -> tuple[list[int], bool]:
    """Greedy over random logits within `max_tokens`, the way the decode loop runs a
    constrained sequence. Returns the tokens and whether the closer forced the end."""
    batch = GrammarBatch(VOCAB_SIZE, 1, "cpu")
    generator = torch.Generator().manual_seed(seed)
    closer = BudgetCloser(state, tokenizer.encode)
    token_ids: list[int] = []
    while len(token_ids) < max_tokens:
        logits = torch.randn(1, VOCAB_SIZE, generator=generator)
        token_id = int(batch.apply(logits, [state]).argmax())
        token_ids.append(closer.accept(token_id, max_tokens - len(token_ids)))
        if state.is_terminated():
            return token_ids[:-1], False
        if closer.closing == []:
            return token_ids, True
    return token_ids, False


def test_short_completion_closes_what_is_open(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    state = GrammarState(compiler.compile(json_schema_spec(SCHEMAS[2])))
    for token_id in tokenizer.encode('{"a": {"b'):
        assert state.accept(token_id)
    completion = short_completion(state)
    assert completion is not None
    assert json.loads('{"a": {"b' + completion) == {"a": {"b": {"c": ""}}}


@pytest.mark.parametrize("schema", SCHEMAS)
def test_random_logits_parse_whenever_the_budget_allows(
    compiler: GrammarCompiler, tokenizer: Tokenizer, schema: dict
) -> None:
    compiled = compiler.compile(json_schema_spec(schema))
    num_forced = 0
    for seed in range(4):
        for max_tokens in (16, 40, 90):
            state = GrammarState(compiled)
            needed = len(tokenizer.encode(short_completion(state) or ""))
            token_ids, forced = _generate(state, tokenizer, max_tokens, seed)
            assert len(token_ids) <= max_tokens
            if needed > max_tokens:
                continue
            jsonschema.validate(json.loads(tokenizer.decode(token_ids)), schema)
            num_forced += forced
    assert num_forced > 0  # the budget, not the logits, ended some of them


def test_a_budget_too_small_for_any_document_is_left_alone(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    state = GrammarState(compiler.compile(json_schema_spec(SCHEMAS[1])))
    token_ids, forced = _generate(state, tokenizer, 3, seed=0)
    assert len(token_ids) == 3 and not forced
