"""What a generation request asks for, as every process sees it: sampling, stopping, the prompt
cache and the response's output options, one name per concept from the HTTP field to the
engine. Each type converts itself to and from protobuf here and nowhere else.

Free of torch, so that the frontend and any service can use them without loading it.

A SamplingParams field is an API field of the same name (`frontend.api.schemas`), a proto
field of the same name (`common.proto`; `optional` where unset differs from zero) and what the
sampler reads: adding one touches those four files.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.engine.block_hash import hash_blocks, root_hash
from services.rpc import common_pb2

MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # frequency and presence penalties lie in [-2, 2], repetition in [0, 2]
MAX_LOGIT_BIAS = 100.0
MAX_TOP_LOGPROBS = 5
# A grammar's source (JSON schema, GBNF, regex, tool tags): larger ones are refused before any
# compiling, which grows with it.
MAX_GRAMMAR_BYTES = 64 * 1024


@dataclass(slots=True, frozen=True)
class Grammar:
    """Structured output: only what this grammar allows is sampled."""

    kind: str  # "json_object", "json_schema", "gbnf", "regex" or "tool_calls"
    source: str  # the JSON schema text, grammar or pattern; empty for json_object
    strict: bool = False  # json_schema: no properties beyond the schema's

    def to_pb(self) -> common_pb2.Grammar:
        return common_pb2.Grammar(kind=self.kind, source=self.source, strict=self.strict)

    @classmethod
    def from_pb(cls, pb: common_pb2.Grammar) -> "Grammar":
        return cls(pb.kind, pb.source, pb.strict)


@dataclass(slots=True)
class SamplingParams:
    """Every default disables its feature, so a default instance samples plainly at T=1."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 0 keeps only the most likely token
    top_k: int = 0  # 0 disables
    # With a seed, each position draws from a generator seeded by (seed, position), so
    # prefill and decode agree and batching never changes a seeded output.
    seed: int | None = None
    min_p: float = 0.0  # 0 disables
    typical_p: float = 1.0  # 1 disables; 0 keeps only the most typical token
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    repetition_penalty: float = 1.0  # over prompt and generated tokens; 0 or 1 disables
    mirostat_target: float | None = None  # bits of surprise per token (mirostat v2); None: off
    mirostat_lr: float = 0.1
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: bool = False  # report each sampled token's logprob
    top_logprobs: int = 0  # and this many most likely alternatives
    grammar: Grammar | None = None

    @property
    def is_greedy(self) -> bool:
        """Argmax after logit bias and penalties; such a row skips temperature and mirostat."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_repetition_penalty(self) -> bool:
        return self.repetition_penalty not in (0.0, 1.0)

    @property
    def needs_output_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def needs_history(self) -> bool:
        """Whether sampling looks at the tokens so far (penalties)."""
        return self.needs_repetition_penalty or self.needs_output_penalties

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def to_pb(self) -> common_pb2.SamplingParams:
        """Only the fields that differ from their defaults are set: an unset field reads as
        its default on the other side, exactly (a float32 0.1 would not be)."""
        values = {name: getattr(self, name) for name in _PLAIN_FIELDS}
        changed = {k: v for k, v in values.items() if v != _DEFAULTS[k]}
        pb = common_pb2.SamplingParams(**changed)
        if self.grammar is not None:
            pb.grammar.CopyFrom(self.grammar.to_pb())
        return pb

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> "SamplingParams":
        """An unset optional field takes its default; the others' proto zero is their default."""
        values = {
            name: getattr(pb, name)
            for name in _PLAIN_FIELDS
            if not pb.DESCRIPTOR.fields_by_name[name].has_presence or pb.HasField(name)
        }
        values["logit_bias"] = dict(pb.logit_bias)
        grammar = Grammar.from_pb(pb.grammar) if pb.HasField("grammar") else None
        return cls(**values, grammar=grammar)


_PLAIN_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "grammar")
_DEFAULTS = {name: getattr(SamplingParams(), name) for name in _PLAIN_FIELDS}


def validate(params: SamplingParams, vocab_size: int | None = None) -> None:
    """Raises ValueError naming the first field out of range. Comparisons are written so that
    NaN fails them too. Bias ids are checked against the vocabulary only when it is given."""
    _check("temperature", 0.0 <= params.temperature <= MAX_TEMPERATURE, f"[0, {MAX_TEMPERATURE}]")
    _check("top_p", 0.0 <= params.top_p <= 1.0, "[0, 1]")
    _check("top_k", params.top_k >= 0, ">= 0")
    _check("min_p", 0.0 <= params.min_p <= 1.0, "[0, 1]")
    _check("typical_p", 0.0 <= params.typical_p <= 1.0, "[0, 1]")
    for name in ("frequency_penalty", "presence_penalty"):
        _check(name, -MAX_PENALTY <= getattr(params, name) <= MAX_PENALTY, "[-2, 2]")
    _check("repetition_penalty", 0.0 <= params.repetition_penalty <= MAX_PENALTY, "[0, 2]")
    if params.mirostat_target is not None:
        _check("mirostat_target", params.mirostat_target > 0.0, "> 0")
    _check("mirostat_lr", params.mirostat_lr > 0.0, "> 0")
    _check("top_logprobs", 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS, "[0, 5]")
    for token_id, bias in params.logit_bias.items():
        in_vocab = token_id >= 0 and (vocab_size is None or token_id < vocab_size)
        _check("logit_bias", in_vocab, f"token ids in [0, {vocab_size or 'vocab_size'})")
        _check("logit_bias", -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "values in [-100, 100]")


def _check(name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}")


@dataclass(slots=True)
class Stopping:
    max_tokens: int  # completion tokens, prefill's first token included
    stop: list[str] = field(default_factory=list)  # a match ends the text
    ignore_eos: bool = False
    include_stop_str: bool = False  # the text ends with the matched stop string, else before it

    def to_pb(self) -> common_pb2.Stopping:
        return common_pb2.Stopping(
            max_tokens=self.max_tokens,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            include_stop_str=self.include_stop_str,
        )

    @classmethod
    def from_pb(cls, pb: common_pb2.Stopping) -> "Stopping":
        return cls(pb.max_tokens, list(pb.stop), pb.ignore_eos, pb.include_stop_str)


@dataclass(slots=True)
class PromptCache:
    """How a prompt may use the prefix cache (the API's prompt_cache_* fields)."""

    # Salts the chain of block hashes: prompts with different keys share no cache entries.
    isolation_key: str = ""
    max_len: int | None = None  # at most this many leading prompt tokens are cached; None: all

    def to_pb(self) -> common_pb2.PromptCache:
        return common_pb2.PromptCache(isolation_key=self.isolation_key, max_len=self.max_len)

    @classmethod
    def from_pb(cls, pb: common_pb2.PromptCache) -> "PromptCache":
        return cls(pb.isolation_key, pb.max_len if pb.HasField("max_len") else None)

    def block_hashes(self, token_ids: Sequence[int], block_size: int) -> list[bytes]:
        """The salted hash chain of the prompt's full blocks within max_len: the keys its
        blocks are cached under (decode extends the chain over generated blocks)."""
        return hash_blocks(token_ids, block_size, self.isolation_key, self.max_len)

    def root_hash(self) -> bytes:
        """The chain's root, which the first block's hash extends."""
        return root_hash(self.isolation_key)

    def servable_tokens(self, num_tokens: int) -> int:
        """How many leading tokens of a prompt of `num_tokens` the cache may serve: never the
        last one, whose logits give the first token, and at most max_len."""
        limit = num_tokens - 1
        return limit if self.max_len is None else min(limit, self.max_len)


@dataclass(slots=True)
class OutputOptions:
    """What the response shows besides the generated text (the frontend's concern alone)."""

    stream: bool = False
    include_usage: bool = False
    perf_metrics_in_response: bool = False
    echo: bool = False
    echo_last: int = 0  # > 0: echo only the prompt's last echo_last tokens
    raw_output: bool = False
    return_token_ids: bool = False
    # Chat with a tools grammar: `<tool_call>` blocks in the output become message.tool_calls.
    tool_calls: bool = False

    def echo_count(self, num_prompt_tokens: int) -> int:
        """How many of the prompt's last tokens the response echoes."""
        if self.echo_last > 0:
            return min(self.echo_last, num_prompt_tokens)
        return num_prompt_tokens if self.echo else 0
