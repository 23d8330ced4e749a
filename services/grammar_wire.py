"""The request's grammar to a compiled, per-sequence grammar state.

Kept apart from `services.wire` because it loads the grammar engine, which only the
prefill and decode services need.
"""

import json
from functools import lru_cache

from services.engine.grammar import (
    GBNF,
    JSON_OBJECT,
    JSON_SCHEMA,
    REGEX,
    TOOL_CALLS,
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    GrammarState,
    gbnf_spec,
    json_object_spec,
    json_schema_spec,
    regex_spec,
    tool_calls_spec,
)
from services.errors import InvalidArgumentError
from services.request_params import MAX_GRAMMAR_BYTES, Grammar

# A grammar that takes longer to compile is refused; its worker thread finishes it anyway.
COMPILE_TIMEOUT_S = 10.0
# Specs kept by their request grammar, as many as the compiler keeps compiled grammars: parsing
# and checking a large schema (30 objects of 20 properties) takes 5-16 ms of CPU, which
# a client repeating its response_format should pay once, not on every request.
SPEC_CACHE_SIZE = 256


def request_field(kind: str) -> str:
    """The API field a grammar comes from; its errors start with it ("tools: ...")."""
    return "tools" if kind == TOOL_CALLS else "response_format"


@lru_cache(maxsize=SPEC_CACHE_SIZE)
def grammar_spec(grammar: Grammar) -> GrammarSpec:
    """Checks the grammar now (no tokenizer needed), so a bad one fails before it queues.
    Memoized by the grammar (kind, source, strict); a bad grammar is not, and fails each time."""
    if len(grammar.source.encode()) > MAX_GRAMMAR_BYTES:
        raise InvalidArgumentError(
            f"{request_field(grammar.kind)}: the schema or grammar is larger than "
            f"{MAX_GRAMMAR_BYTES // 1024} KiB"
        )
    try:
        if grammar.kind == JSON_OBJECT:
            return json_object_spec()
        if grammar.kind == JSON_SCHEMA:
            try:
                schema = json.loads(grammar.source)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
            return json_schema_spec(schema, grammar.strict)
        if grammar.kind == GBNF:
            return gbnf_spec(grammar.source)
        if grammar.kind == REGEX:
            return regex_spec(grammar.source)
        if grammar.kind == TOOL_CALLS:
            return tool_calls_spec(grammar.source)
    except GrammarError as exc:
        raise InvalidArgumentError(f"{request_field(grammar.kind)}: {exc}") from exc
    raise InvalidArgumentError(f"response_format: unknown grammar kind {grammar.kind!r}")


async def grammar_state(grammar: Grammar | None, compiler: GrammarCompiler) -> GrammarState | None:
    """A fresh state for the request's grammar, parsed and compiled off the event loop
    within COMPILE_TIMEOUT_S (cached)."""
    if grammar is None:
        return None
    field = request_field(grammar.kind)
    try:
        compiled = await compiler.compile_async(lambda: grammar_spec(grammar), COMPILE_TIMEOUT_S)
    except GrammarError as exc:
        raise InvalidArgumentError(f"{field}: {exc}") from exc
    except TimeoutError:
        raise InvalidArgumentError(
            f"{field}: compiling the schema or grammar took over {COMPILE_TIMEOUT_S:.0f} s; "
            "simplify it"
        ) from None
    return GrammarState(compiled)
