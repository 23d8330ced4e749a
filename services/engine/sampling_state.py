"""What the sampler keeps per sequence and hands back per token (what a request asks of it
is `services.request_params.SamplingParams`)."""

from collections.abc import Sequence
from dataclasses import dataclass


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
