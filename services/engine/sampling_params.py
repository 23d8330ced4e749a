"""What a request asks of the sampler, the per-sequence state it keeps, and the range checks.

Free of torch so that any process can validate parameters without loading it.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # frequency and presence penalties lie in [-2, 2], repetition in [0, 2]
MAX_LOGIT_BIAS = 100.0
MAX_TOP_LOGPROBS = 5


@dataclass(slots=True)
class SamplingParams:
    """Every default disables its feature, so a default instance samples plainly at T=1."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None
    min_p: float = 0.0  # 0 disables
    typical_p: float = 1.0  # 0 or 1 disables
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 0 or 1 disables
    mirostat_target: float | None = None  # bits of surprise per token; None disables
    mirostat_lr: float = 0.1
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0

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


@dataclass(slots=True)
class TokenHistory:
    """The tokens a row's penalties look at; plain lists owned by the caller."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]


@dataclass(slots=True)
class MirostatState:
    """Per sequence, updated in place by each sample; mu starts at twice the target."""

    mu: float

    @classmethod
    def start(cls, target: float) -> "MirostatState":
        return cls(mu=2.0 * target)


@dataclass(slots=True)
class SampledToken:
    token_id: int
    # Log-softmax of the raw logits; None unless the request asked for logprobs.
    logprob: float | None
    top: list[tuple[int, float]]  # the top_logprobs most likely (id, logprob), descending


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
