"""Grammars a request can constrain its output to, compiled once per (grammar, tokenizer).

A `GrammarSpec` names what a request asks for and is the compile-cache key. `GrammarCompiler`
turns it into xgrammar's token-level automaton for one model's vocabulary; `GrammarState` walks
that automaton as a sequence emits tokens; `grammar_batch.GrammarBatch` masks the logits of a
whole decode step at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import xgrammar as xgr
from xgrammar import CompiledGrammar

from services.engine import tool_grammar
from services.engine.tokenizer import Tokenizer

__all__ = [
    "CompiledGrammar",
    "GrammarCacheStats",
    "GrammarCompiler",
    "GrammarError",
    "GrammarSpec",
    "GrammarState",
    "gbnf_spec",
    "json_object_spec",
    "json_schema_spec",
    "regex_spec",
    "tool_calls_spec",
]

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
GBNF = "gbnf"
REGEX = "regex"
TOOL_CALLS = "tool_calls"
KINDS = (JSON_OBJECT, JSON_SCHEMA, GBNF, REGEX, TOOL_CALLS)

# Whitespace between JSON tokens is free in JSON but a known trap for constrained decoding: a
# model can loop on newlines forever, every one of them grammatical. A bound still leaves room
# for pretty-printed output nested a few levels deep.
MAX_JSON_WHITESPACE = 16

# "json_object" is JSON with an object at the top: the any-object schema, so that it gets the
# same whitespace bound as schemas do (the builtin JSON grammar has none, and allows arrays).
_ANY_OBJECT_SCHEMA = '{"type": "object"}'

_T = TypeVar("_T")

# xgrammar's errors start with a timestamp and a C++ source location; the rest is the reason.
_ERROR_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: .*? is false: )?")


@dataclass(slots=True, frozen=True)
class GrammarSpec:
    """What one request's output must match; equal specs share one compiled grammar."""

    kind: str
    # Schema JSON (compact, keys in the client's order), GBNF text, a regex, or the tools JSON
    # of `tool_grammar`; empty for json_object.
    source: str
    # json_schema only: properties and items the schema does not name are not allowed.
    strict: bool = True


class GrammarError(ValueError):
    """The grammar or schema is invalid or uses something the grammar engine cannot enforce."""


def json_object_spec() -> GrammarSpec:
    return GrammarSpec(JSON_OBJECT, "")


def json_schema_spec(schema: dict[str, Any], strict: bool = True) -> GrammarSpec:
    """Validates the schema now, without a tokenizer, so a bad request fails before it queues."""
    if not isinstance(schema, dict):
        raise GrammarError(f"JSON schema must be an object, got {type(schema).__name__}")
    try:
        # Compact but not key-sorted: the grammar emits properties in the schema's order,
        # which the client chose and expects back.
        source = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"JSON schema is not serializable as JSON: {exc}") from exc
    spec = GrammarSpec(JSON_SCHEMA, source, strict)
    _check(spec, lambda: _schema_grammar(spec))
    return spec


def gbnf_spec(text: str) -> GrammarSpec:
    spec = GrammarSpec(GBNF, text)
    _check(spec, lambda: xgr.Grammar.from_ebnf(text))
    return spec


def regex_spec(pattern: str) -> GrammarSpec:
    spec = GrammarSpec(REGEX, pattern)
    _check(spec, lambda: xgr.Grammar.from_regex(pattern))
    return spec


def tool_calls_spec(source: str) -> GrammarSpec:
    """Calls of the given tools in the default tool format; see `tool_grammar`."""
    try:
        spec = GrammarSpec(TOOL_CALLS, tool_grammar.canonical_source(source))
    except ValueError as exc:
        raise GrammarError(str(exc)) from exc
    _check(spec, lambda: xgr.Grammar.from_structural_tag(_tool_calls_tag(spec)))
    return spec


def _tool_calls_tag(spec: GrammarSpec) -> xgr.StructuralTag:
    return tool_grammar.structural_tag(spec.source, MAX_JSON_WHITESPACE)


def _schema_grammar(spec: GrammarSpec) -> xgr.Grammar:
    return xgr.Grammar.from_json_schema(
        spec.source, strict_mode=spec.strict, max_whitespace_cnt=MAX_JSON_WHITESPACE
    )


def _check(spec: GrammarSpec, build: Callable[[], _T]) -> _T:
    """Runs one xgrammar call, turning its errors into a GrammarError that says what is wrong."""
    try:
        return build()
    except GrammarError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        detail = _ERROR_PREFIX.sub("", str(exc)).strip() or type(exc).__name__
        what = {
            JSON_SCHEMA: "JSON schema",
            GBNF: "GBNF grammar",
            REGEX: "regex",
            TOOL_CALLS: "tool parameters schema",
        }
        raise GrammarError(f"invalid {what.get(spec.kind, spec.kind)}: {detail}") from exc


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar sees it: each id's text, special tokens blanked so that no
    grammar can spell them, ids past the tokenizer (a padded lm_head) unreachable."""
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer's {tokenizer.vocab_size}")
    if tokenizer.is_byte_level:
        # Our own piece bytes, the same ones detokenization emits, already decoded.
        vocab = list(tokenizer.piece_bytes())
        vocab_type, add_prefix_space = xgr.VocabType.RAW, False
    else:
        vocab = [b""] * tokenizer.vocab_size
        for piece, token_id in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            vocab[token_id] = piece.encode()
        # xgrammar reads the encoding (byte fallback, metaspace, ...) from the tokenizer JSON.
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
        vocab_type, add_prefix_space = metadata["vocab_type"], metadata["add_prefix_space"]
    for token_id in range(tokenizer.vocab_size):
        if tokenizer.is_special(token_id):
            vocab[token_id] = b""
    return xgr.TokenizerInfo(
        vocab,
        vocab_type,
        vocab_size=vocab_size,
        # None makes xgrammar guess the stop tokens; guessing beats never stopping.
        stop_token_ids=list(tokenizer.eos_token_ids) or None,
        add_prefix_space=add_prefix_space,
    )


@dataclass(slots=True)
class GrammarCacheStats:
    hits: int
    misses: int
    size: int


class GrammarCompiler:
    """Compiles specs for one model's vocabulary. Thread-safe; equal specs compile once, and a
    spec being compiled is waited on rather than compiled again."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, max_threads: int = 2, cache_size: int = 256
    ) -> None:
        self.vocab_size = vocab_size
        self.tokenizer_info = tokenizer_info(tokenizer, vocab_size)
        # xgrammar's own cache is unbounded by count; ours is the one with an eviction order.
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads, cache_enabled=False
        )
        self._cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._pending: dict[GrammarSpec, Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="grammar-compile")

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        with self._lock:
            compiled = self._cached(spec)
            if compiled is not None:
                return compiled
            pending = self._pending.get(spec)
            is_owner = pending is None
            if pending is None:
                pending = self._pending[spec] = Future()
                self._misses += 1
            else:
                self._hits += 1
        if not is_owner:
            return pending.result()
        try:
            compiled = _check(spec, lambda: self._compile_uncached(spec))
        except BaseException as exc:
            with self._lock:
                del self._pending[spec]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[spec]
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        pending.set_result(compiled)
        return compiled

    async def compile_async(
        self, spec_of: Callable[[], GrammarSpec], timeout_s: float
    ) -> CompiledGrammar:
        """Builds the spec (`spec_of` parses and checks the grammar) and compiles it on a
        worker thread, so that no grammar work runs on the event loop (xgrammar releases the
        GIL: serving goes on). TimeoutError after `timeout_s`; the thread then finishes on
        its own and caches what it compiled."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor, lambda: self.compile(spec_of()))
        return await asyncio.wait_for(work, timeout_s)

    def stats(self) -> GrammarCacheStats:
        with self._lock:
            return GrammarCacheStats(self._hits, self._misses, len(self._cache))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _cached(self, spec: GrammarSpec) -> CompiledGrammar | None:
        """Callers hold the lock."""
        compiled = self._cache.get(spec)
        if compiled is not None:
            self._cache.move_to_end(spec)
            self._hits += 1
        return compiled

    def _compile_uncached(self, spec: GrammarSpec) -> CompiledGrammar:
        if spec.kind == JSON_OBJECT:
            return self._compiler.compile_json_schema(
                _ANY_OBJECT_SCHEMA, strict_mode=False, max_whitespace_cnt=MAX_JSON_WHITESPACE
            )
        if spec.kind == JSON_SCHEMA:
            return self._compiler.compile_json_schema(
                spec.source, strict_mode=spec.strict, max_whitespace_cnt=MAX_JSON_WHITESPACE
            )
        if spec.kind == GBNF:
            return self._compiler.compile_grammar(spec.source)
        if spec.kind == REGEX:
            return self._compiler.compile_regex(spec.source)
        if spec.kind == TOOL_CALLS:
            return self._compiler.compile_structural_tag(_tool_calls_tag(spec))
        raise GrammarError(f"unknown grammar kind {spec.kind!r}; expected one of {KINDS}")


class GrammarState:
    """Where one sequence is in its grammar. Not thread-safe: owned by the decode loop."""

    __slots__ = ("matcher",)

    def __init__(self, compiled: CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """False when the grammar forbids the token; the state is then unchanged."""
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """True once a stop token was accepted, which the grammar allows only when complete."""
        return self.matcher.is_terminated()

    @property
    def stop_token_ids(self) -> list[int]:
        return self.matcher.stop_token_ids
