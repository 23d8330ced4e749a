"""What the prefill engine tracks per request, and what it hands back."""

import asyncio
import time
from dataclasses import dataclass, field

import torch

from services.engine.grammar import GrammarState
from services.engine.logprobs import token_logprobs
from services.engine.sampling_state import MirostatState, SampledToken
from services.request_params import SamplingParams


@dataclass(slots=True)
class PrefillResult:
    handle_id: str
    first_token: SampledToken
    block_ids: list[int]
    num_cached_tokens: int
    queue_ns: int
    compute_ns: int
    prompt_logprobs: list[SampledToken]
    mirostat_mu: float | None


@dataclass(slots=True)
class PrefillJob:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    # The prompt cache's hash chain of the prompt's full blocks and its root, and how many
    # leading tokens the cache may serve (`PromptCache.servable_tokens`).
    block_hashes: list[bytes]
    root_hash: bytes
    servable_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    # Logprobs of every prompt token after the first (echo); the prompt is computed in full.
    wants_prompt_logprobs: bool = False
    prompt_logprobs: list[SampledToken] = field(default_factory=list)
    mirostat: MirostatState | None = None
    grammar: GrammarState | None = None  # structured output: constrains the first token
    arrival_ns: int = field(default_factory=time.monotonic_ns)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int = 0
    num_registered_blocks: int = 0
    first_run_ns: int = 0
    compute_ns: int = 0

    def __post_init__(self) -> None:
        if self.sampling.mirostat_target is not None:
            self.mirostat = MirostatState.start(self.sampling.mirostat_target)

    def parent(self, block_index: int) -> bytes:
        """The hash the block at `block_index` follows: the previous block's, or the root."""
        return self.block_hashes[block_index - 1] if block_index else self.root_hash

    @property
    def num_remaining(self) -> int:
        return len(self.token_ids) - self.num_computed

    def add_prompt_logprobs(self, logits: torch.Tensor, start_pos: int) -> None:
        """logits: [n, vocab] for the chunk's tokens from start_pos; row i predicts the prompt
        token at start_pos + i + 1, when there is one."""
        targets = self.token_ids[start_pos + 1 : start_pos + 1 + logits.shape[0]]
        if not targets:
            return
        rows = logits[: len(targets)]
        ids = torch.tensor(targets, device=logits.device)
        entries = token_logprobs(rows, [self.sampling] * len(targets), ids)
        for token_id, (logprob, top) in zip(targets, entries, strict=True):
            self.prompt_logprobs.append(SampledToken(token_id, logprob, top))


@dataclass(slots=True)
class Handle:
    request_id: str
    block_ids: list[int]
    num_tokens: int
    expires_at: float  # time.monotonic()
    pulling: bool = False  # a PullKv call is streaming it
