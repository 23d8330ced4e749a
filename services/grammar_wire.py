"""The request's grammar (protobuf) to a compiled, per-sequence grammar state.

Kept apart from `services.wire` because it loads the grammar engine, which only the
prefill and decode services need.
"""

import json

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
from services.rpc import common_pb2


def request_field(kind: str) -> str:
    """The API field a grammar comes from; its errors start with it ("tools: ...")."""
    return "tools" if kind == TOOL_CALLS else "response_format"


def grammar_spec(pb: common_pb2.Grammar) -> GrammarSpec:
    """Checks the grammar now (no tokenizer needed), so a bad one fails before it queues."""
    try:
        if pb.kind == JSON_OBJECT:
            return json_object_spec()
        if pb.kind == JSON_SCHEMA:
            try:
                schema = json.loads(pb.source)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
            return json_schema_spec(schema, pb.strict)
        if pb.kind == GBNF:
            return gbnf_spec(pb.source)
        if pb.kind == REGEX:
            return regex_spec(pb.source)
        if pb.kind == TOOL_CALLS:
            return tool_calls_spec(pb.source)
    except GrammarError as exc:
        raise InvalidArgumentError(f"{request_field(pb.kind)}: {exc}") from exc
    raise InvalidArgumentError(f"response_format: unknown grammar kind {pb.kind!r}")


async def grammar_state(
    sampling: common_pb2.SamplingParams, compiler: GrammarCompiler
) -> GrammarState | None:
    """A fresh state for the request's grammar, compiled off the event loop (cached)."""
    if not sampling.HasField("grammar"):
        return None
    spec = grammar_spec(sampling.grammar)
    try:
        compiled = await compiler.compile_async(spec)
    except GrammarError as exc:
        raise InvalidArgumentError(f"{request_field(spec.kind)}: {exc}") from exc
    return GrammarState(compiled)
