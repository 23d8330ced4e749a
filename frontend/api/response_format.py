"""`response_format`: the OpenAI and Fireworks forms of structured output, as one grammar.

The stages compile and enforce the grammar (and say what is wrong with an invalid one);
here only the request's shape is checked.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.request_params import Grammar


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    """Any JSON object, or (Fireworks) one matching `schema`."""

    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class JsonSchema(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    """OpenAI's form: `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`."""

    type: Literal["json_schema"]
    json_schema: JsonSchema


class GrammarFormat(_Strict):
    """An arbitrary grammar in GBNF."""

    type: Literal["grammar"]
    grammar: str = Field(min_length=1)


FORMAT_TYPES = frozenset({"text", "json_object", "json_schema", "grammar"})
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat | GrammarFormat,
    Field(discriminator="type"),
]


def grammar_of(response_format: Any) -> Grammar | None:
    """The grammar a response_format asks for; None for plain text."""
    if isinstance(response_format, JsonObjectFormat):
        if response_format.schema_ is None:
            return Grammar("json_object", "", strict=False)
        return Grammar("json_schema", json.dumps(response_format.schema_), strict=False)
    if isinstance(response_format, JsonSchemaFormat):
        spec = response_format.json_schema
        return Grammar("json_schema", json.dumps(spec.schema_), strict=bool(spec.strict))
    if isinstance(response_format, GrammarFormat):
        return Grammar("gbnf", response_format.grammar, strict=False)
    return None
