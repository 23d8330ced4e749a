"""A request's state inside the decode service (pure Python)."""

import enum
from dataclasses import dataclass, field
from typing import Any

from services.decode.closing import BudgetCloser
from services.decode.drafts import Drafter
from services.engine.grammar import GrammarState
from services.engine.sampling_state import MirostatState, TokenHistory
from services.request_params import PromptCache, SamplingParams


class Finish(enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"


@dataclass(slots=True)
class StopRules:
    max_tokens: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    ignore_eos: bool = False

    def check(self, token_id: int, num_generated: int, num_tokens: int) -> Finish | None:
        """Why generation ends after `token_id`, the `num_generated`-th new token, if it does."""
        if token_id in self.eos_token_ids and not self.ignore_eos:
            return Finish.STOP
        if num_generated >= self.max_tokens or num_tokens >= self.max_model_len:
            return Finish.LENGTH
        return None


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + generated; the last one's KV is not computed yet
    num_prompt_tokens: int
    sampling: SamplingParams
    stop: StopRules
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # leading tokens whose KV is in the cache
    joined_ns: int = 0  # when it first joined a batch
    finish: Finish | None = None
    # Where the engine delivers (token_id, finish) pairs; owned by the request's handler.
    outputs: Any = None
    # How the request may use the prefix cache, and the hashes of the sequence's full blocks
    # (the prompt's chain as `prompt_cache` gives it). With `extends_chain` (the chain covers
    # every full prompt block: the request did not cap what may be cached), generated blocks
    # extend it as they fill, and the last block, partly filled, is offered to partial
    # matches when the sequence ends.
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    block_hashes: list[bytes] = field(default_factory=list)
    extends_chain: bool = False
    num_offered_blocks: int = 0  # leading blocks offered to the prefix cache so far
    # Decode computes the prompt itself (no KV handle): the prompt tokens its prefix cache
    # served when it joined, and when its first token was sampled.
    computes_prompt: bool = False
    num_reused_tokens: int = 0
    first_token_ns: int = 0
    mirostat: MirostatState | None = None
    grammar: GrammarState | None = None  # structured output: what may come next
    closer: BudgetCloser | None = None  # with a grammar: keeps it finishable in the budget
    drafter: Drafter | None = None  # speculative decoding: proposes draft tokens

    def history(self) -> TokenHistory:
        prompt_len = self.num_prompt_tokens
        return TokenHistory(self.token_ids[:prompt_len], self.token_ids[prompt_len:])

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def tokens_left(self) -> int:
        """New tokens it may still add, the one sampled next included."""
        return min(
            self.stop.max_tokens - self.num_generated,
            self.stop.max_model_len - len(self.token_ids),
        )
