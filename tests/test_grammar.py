"""Constrained decoding on the real tokenizer: whatever the logits, the output fits the grammar."""

import asyncio
import json
import re
import threading
import time

import jsonschema
import pytest
import torch
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as BackendTokenizer

from services import grammar_wire
from services.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    GrammarState,
    gbnf_spec,
    json_object_spec,
    json_schema_spec,
    regex_spec,
    tokenizer_info,
)
from services.engine.grammar_batch import GrammarBatch
from services.engine.tokenizer import Tokenizer
from services.errors import InvalidArgumentError
from services.request_params import Grammar
from tests.conftest import VOCAB_SIZE

MAX_TOKENS = 200
STOP_IDS = {0, 2}  # <|endoftext|>, <|im_end|>


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props)}


_NAME = {"type": "string", "maxLength": 8}
_DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
_BOOL = {"type": "boolean"}
# Bounded strings and numbers: random logits would otherwise wander past the token cap.
SCHEMAS = [
    _obj({"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"user": _obj({"id": _DIGIT, "profile": _obj({"nick": _NAME, "on": _BOOL})})}),
    _obj({"tags": {"type": "array", "items": _NAME, "minItems": 2, "maxItems": 4}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]}}),
    _obj({"a": _NAME, "b": {"type": "integer", "minimum": -5, "maximum": 5}}, required=["a"]),
    _obj({"score": {"type": "number", "minimum": 0, "maximum": 1}, "n": _DIGIT}),
    _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}),
    _obj({"points": {"type": "array", "items": _obj({"x": _DIGIT, "y": _DIGIT}), "minItems": 1}}),
    _obj({"kind": {"const": "event"}, "when": {"type": "string", "pattern": "^20[0-9]{2}$"}}),
    _obj({"value": {"anyOf": [_DIGIT, {"type": "string", "maxLength": 4}, {"type": "null"}]}}),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 3},
    _obj({"id": {"type": "string", "format": "uuid"}, "day": {"type": "string", "format": "date"}}),
    _obj({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}}),
]


def _generate(state: GrammarState, batch: GrammarBatch, seed: int) -> list[int]:
    """Greedy over random logits: the grammar alone decides what comes out."""
    generator = torch.Generator().manual_seed(seed)
    token_ids: list[int] = []
    for _ in range(MAX_TOKENS):
        logits = torch.randn(1, VOCAB_SIZE, generator=generator)
        token_id = int(batch.apply(logits, [state]).argmax())
        assert state.accept(token_id)
        if state.is_terminated():
            assert token_id in STOP_IDS
            return token_ids
        token_ids.append(token_id)
    raise AssertionError(f"not terminated after {MAX_TOKENS} tokens")


def _finite_ids(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def test_compile_cache_returns_the_same_grammar(compiler: GrammarCompiler) -> None:
    before = compiler.stats()
    schema = {"type": "object", "properties": {"k": {"type": "string"}}}
    first = compiler.compile(json_schema_spec(schema))
    assert compiler.compile(json_schema_spec(schema)) is first
    assert compiler.compile(json_schema_spec(json.loads(json.dumps(schema)))) is first
    after = compiler.stats()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 2)
    assert compiler.compile(json_schema_spec(schema, strict=False)) is not first


def test_cache_evicts_least_recently_used(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE, cache_size=2)
    a, b, c = (regex_spec(p) for p in ("a+", "b+", "c+"))
    compiled_a = compiler.compile(a)
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent, so c evicts b
    compiler.compile(c)
    assert compiler.compile(a) is compiled_a
    compiler.compile(b)
    assert (compiler.stats().misses, compiler.stats().size) == (4, 2)


def test_compile_async_compiles_concurrent_requests_once(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE)
    spec = json_schema_spec(SCHEMAS[1])

    async def compile_four() -> list:
        return await asyncio.gather(*(compiler.compile_async(lambda: spec, 60) for _ in range(4)))

    results = asyncio.run(compile_four())
    assert all(result is results[0] for result in results)
    assert (compiler.stats().misses, compiler.stats().hits) == (1, 3)
    compiler.close()


def test_grammar_work_runs_off_the_event_loop_within_a_time_limit(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE)
    release = threading.Event()

    def pathological() -> GrammarSpec:  # parsing that does not end in time
        release.wait(10)
        return json_schema_spec(SCHEMAS[1])

    async def serve_meanwhile() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        with pytest.raises(TimeoutError):
            await compiler.compile_async(pathological, 0.3)
        ticker.cancel()
        return ticks

    assert asyncio.run(serve_meanwhile()) >= 10  # the loop went on serving
    release.set()
    compiler.close()


def test_a_grammar_over_its_time_limit_is_the_requests_error(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grammar_wire, "COMPILE_TIMEOUT_S", 1e-6)
    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE)
    grammar = Grammar("json_schema", json.dumps(SCHEMAS[1]), strict=True)
    with pytest.raises(InvalidArgumentError, match="^response_format: compiling .* took over"):
        asyncio.run(grammar_wire.grammar_state(grammar, compiler))
    compiler.close()


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "strnig"}, 'Unsupported type "strnig"'),
        ({"type": "object", "required": "a"}, "required must be an array"),
        ({"type": "string", "pattern": "[a-"}, "Unclosed '['"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        (["not", "an", "object"], "must be an object"),
        ({"enum": [float("nan")]}, "not serializable"),
    ],
)
def test_invalid_schema_names_the_problem(schema: object, message: str) -> None:
    with pytest.raises(GrammarError, match="JSON schema") as info:
        json_schema_spec(schema)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert "/project/cpp" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('root ::= "a" item', 'Rule "item" is not defined'),
        ('start ::= "a"', 'root rule with name "root" is not found'),
        ("root ::= [a-", "Unterminated character class"),
    ],
)
def test_invalid_gbnf_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(GrammarError, match="invalid GBNF grammar") as info:
        gbnf_spec(text)
    assert message in str(info.value)


def test_unknown_kind_is_rejected_at_compile(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError, match="unknown grammar kind 'yaml'"):
        compiler.compile(GrammarSpec("yaml", "a: 1"))


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_random_logits_yield_valid_json(
    compiler: GrammarCompiler, tokenizer: Tokenizer, index: int
) -> None:
    schema = SCHEMAS[index]
    state = GrammarState(compiler.compile(json_schema_spec(schema)))
    text = tokenizer.decode(_generate(state, GrammarBatch(VOCAB_SIZE, 1, "cpu"), seed=index))
    jsonschema.validate(json.loads(text), schema)


def test_gbnf_and_regex_constrain_the_text(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    batch = GrammarBatch(VOCAB_SIZE, 1, "cpu")
    gbnf = gbnf_spec('root ::= "(" num (" + " num){0,3} ")"\nnum ::= [1-9] [0-9]{0,2}')
    for seed in range(3):
        text = tokenizer.decode(_generate(GrammarState(compiler.compile(gbnf)), batch, seed))
        assert re.fullmatch(r"\([1-9]\d{0,2}( \+ [1-9]\d{0,2}){0,3}\)", text), text
        regex = regex_spec(r"[a-z]{2,6}@example\.(com|org)")
        text = tokenizer.decode(_generate(GrammarState(compiler.compile(regex)), batch, seed))
        assert re.fullmatch(r"[a-z]{2,6}@example\.(com|org)", text), text


def test_json_object_allows_any_object_and_nothing_else(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    compiled = compiler.compile(json_object_spec())
    batch = GrammarBatch(VOCAB_SIZE, 1, "cpu")
    first = _finite_ids(batch.apply(torch.zeros(1, VOCAB_SIZE), [GrammarState(compiled)])[0])
    assert tokenizer.token_to_id("{") in first
    assert tokenizer.token_to_id("[") not in first
    assert all(tokenizer.decode([i]).lstrip().startswith("{") for i in first)
    state = GrammarState(compiled)
    text = '{"a": [1, {"b": null}], "c": "d"}'
    assert all(state.accept(token_id) for token_id in tokenizer.encode(text))
    assert state.accept(2) and state.is_terminated()
    assert not GrammarState(compiled).accept(tokenizer.encode("[1]")[0])


def test_rejected_token_leaves_the_state_unchanged(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    state = GrammarState(compiler.compile(gbnf_spec('root ::= "yes" | "no"')))
    assert not state.accept(2)  # eos before the grammar is complete
    assert not state.accept(tokenizer.encode("maybe")[0])
    assert all(state.accept(token_id) for token_id in tokenizer.encode("no"))
    assert state.accept(2) and state.is_terminated()


def test_mixed_batch_leaves_unconstrained_rows_untouched(compiler: GrammarCompiler) -> None:
    states = [GrammarState(compiler.compile(json_schema_spec(s))) for s in SCHEMAS[:2]]
    logits = torch.randn(4, VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    out = GrammarBatch(VOCAB_SIZE, 8, "cpu").apply(logits, [states[0], None, states[1], None])
    assert out is logits
    assert torch.equal(logits[1], original[1]) and torch.equal(logits[3], original[3])
    for row in (0, 2):
        allowed = _finite_ids(logits[row])
        assert 0 < len(allowed) < VOCAB_SIZE
        assert torch.equal(logits[row, list(allowed)], original[row, list(allowed)])


def test_terminated_state_allows_only_eos(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    state = GrammarState(compiler.compile(gbnf_spec('root ::= "yes" | "no"')))
    assert all(state.accept(token_id) for token_id in tokenizer.encode("yes"))
    batch = GrammarBatch(VOCAB_SIZE, 2, "cpu")
    assert _finite_ids(batch.apply(torch.zeros(1, VOCAB_SIZE), [state])[0]) == STOP_IDS
    assert state.accept(2) and state.is_terminated()
    logits = batch.apply(torch.zeros(2, VOCAB_SIZE), [None, state])
    assert _finite_ids(logits[1]) == STOP_IDS
    assert _finite_ids(logits[0]) == set(range(VOCAB_SIZE))


def test_padded_vocab_and_special_tokens_are_never_allowed(tokenizer: Tokenizer) -> None:
    padded = VOCAB_SIZE + 64
    compiled = GrammarCompiler(tokenizer, padded).compile(regex_spec(r".{1,40}"))
    logits = GrammarBatch(padded, 1, "cpu").apply(torch.zeros(1, padded), [GrammarState(compiled)])
    allowed = _finite_ids(logits[0])
    assert max(allowed) < VOCAB_SIZE
    # "<|im_start|>" is plain text to ".", but as one special token it must stay out of reach.
    assert tokenizer.token_to_id("<|im_start|>") not in allowed


def test_byte_fallback_vocabulary() -> None:
    """A SentencePiece-style vocabulary (metaspace, <0x..> byte tokens) decodes for xgrammar."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ("▁", "a", "b", "▁a", "ab", "▁ab"):
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    normalizer = [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(normalizer)
    decoder = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*decoder, decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok = Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], chat_template=None)
    info = tokenizer_info(tok, 288)
    assert [info.decoded_vocab[i] for i in (vocab["▁ab"], 3 + ord("{"))] == [b" ab", b"{"]
    assert info.decoded_vocab[1] == b"" and info.stop_token_ids == [2]


def test_apply_cost_for_16_constrained_rows(compiler: GrammarCompiler) -> None:
    """Measures, asserts nothing about time: 16 rows mid-JSON, one apply per decode step."""
    specs = [json_schema_spec(SCHEMAS[i % len(SCHEMAS)]) for i in range(16)]
    states = [GrammarState(compiler.compile(spec)) for spec in specs]
    batch = GrammarBatch(VOCAB_SIZE, 16, "cpu")
    generator = torch.Generator().manual_seed(0)
    apply_s = accept_s = 0.0
    warmup, steps = 10, 50
    for step in range(warmup + steps):
        # A finished row is replaced, as a new request would take its slot.
        for i in [i for i, state in enumerate(states) if state.is_terminated()]:
            states[i] = GrammarState(compiler.compile(specs[i]))
        logits = torch.randn(16, VOCAB_SIZE, generator=generator)
        start = time.perf_counter()
        batch.apply(logits, states)
        elapsed = time.perf_counter() - start
        token_ids = logits.argmax(dim=-1).tolist()
        start = time.perf_counter()
        assert all(s.accept(t) for s, t in zip(states, token_ids, strict=True))
        if step >= warmup:
            apply_s += elapsed
            accept_s += time.perf_counter() - start
    print(
        f"\ngrammar apply, 16 constrained rows, vocab {VOCAB_SIZE}, cpu: "
        f"{apply_s / steps * 1e3:.3f} ms/step apply, {accept_s / steps * 1e3:.3f} ms/step accept"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_apply_matches_cpu(compiler: GrammarCompiler) -> None:
    specs = [json_schema_spec(s) for s in SCHEMAS[:3]]
    states = [GrammarState(compiler.compile(spec)) for spec in specs]
    logits = torch.randn(4, VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    rows = [states[0], None, states[1], states[2]]
    expected = GrammarBatch(VOCAB_SIZE, 4, "cpu").apply(logits.clone(), rows)
    on_gpu = GrammarBatch(VOCAB_SIZE, 4, "cuda").apply(logits.cuda(), rows)
    assert torch.equal(on_gpu.cpu(), expected)


def test_equal_grammars_build_their_spec_once(
    compiler: GrammarCompiler, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[dict] = []

    def counting_spec(schema: dict, strict: bool = True) -> GrammarSpec:
        built.append(schema)
        return json_schema_spec(schema, strict)

    monkeypatch.setattr(grammar_wire, "json_schema_spec", counting_spec)
    grammar_wire.grammar_spec.cache_clear()
    source = json.dumps(SCHEMAS[0])
    # Each request's grammar arrives as its own proto, so its own strings.
    requests = [Grammar("json_schema", (source + " ")[:-1], strict=True) for _ in range(3)]

    async def serve(grammars: list[Grammar]) -> list[GrammarState | None]:
        return [await grammar_wire.grammar_state(g, compiler) for g in grammars]

    states = asyncio.run(serve(requests))
    assert len(built) == 1
    assert grammar_wire.grammar_spec(requests[0]) == json_schema_spec(SCHEMAS[0], strict=True)
    for state in states:  # each request still gets its own state, at the start of the schema
        assert state is not None
        assert all(state.accept(t) for t in tokenizer.encode('{"name": "ab", "age": 7}'))
        assert state.accept(tokenizer.eos_token_ids[0]) and state.is_terminated()
    # Another strictness is another spec; a bad grammar is not remembered and fails each time.
    asyncio.run(serve([Grammar("json_schema", source, strict=False)]))
    assert len(built) == 2
    bad = Grammar("json_schema", '{"type": "strnig"}', strict=True)
    for _ in range(2):
        with pytest.raises(InvalidArgumentError, match="strnig"):
            grammar_wire.grammar_spec(bad)
    assert len(built) == 4
    assert grammar_wire.grammar_spec.cache_info().maxsize == grammar_wire.SPEC_CACHE_SIZE
