"""One decode step's grammar masking: every constrained row's allowed tokens in one bitmask,
filled together on the host and applied to the logits in place on their device. A sequence
verifying draft tokens has a row per draft position, each masked for the grammar's state
after the drafts before it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar as xgr

from services.engine.grammar import GrammarState

_BITS_PER_WORD = 32


class GrammarBatch:
    """Reused across decode steps, owned by the decode loop (not thread-safe).

    Invariant for CUDA: the host bitmask is pinned and copied to the device without blocking;
    the next fill may only start after that copy ran, which holds because a step's sampled
    tokens reach the host (to be accepted) before the next step's `apply`.
    """

    def __init__(
        self,
        vocab_size: int,
        max_rows: int,
        device: torch.device | str,
        max_threads: int = 2,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.device = torch.device(device)
        # [max_rows, ceil(vocab_size / 32)] int32, bit j of row i set = token j allowed
        self._bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)
        self._device_bitmask: torch.Tensor | None = None
        if self.device.type == "cuda":
            self._bitmask = self._bitmask.pin_memory()
            self._device_bitmask = torch.empty_like(self._bitmask, device=self.device)
        self._filler = xgr.BatchGrammarMatcher(max_threads)

    def apply(
        self,
        logits: torch.Tensor,
        states: Sequence[GrammarState | None],
        drafts: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """logits: [num_rows, vocab_size]; one state per sequence (None: unconstrained,
        untouched), each with 1 + len(its draft) consecutive rows (one without `drafts`).
        Sets every token the row's grammar forbids to -inf, in place; a terminated row may only
        produce a stop token. Returns `logits`."""
        drafts = drafts or [()] * len(states)
        num_rows = len(states) + sum(len(d) for d in drafts)
        if logits.dim() != 2 or logits.shape[0] != num_rows:
            raise ValueError(f"logits {tuple(logits.shape)} need {num_rows} rows")
        return self.mask(logits, self.fill(states, drafts))

    def fill(
        self, states: Sequence[GrammarState | None], drafts: Sequence[Sequence[int]]
    ) -> list[int]:
        """The host half of `apply`: it reads no logits, so it can run while the forward pass
        that produces them is still on the device. Returns the constrained rows. A draft
        token the grammar forbids leaves the rows after it unmasked: they are never used,
        since that draft can never be sampled."""
        num_rows = len(states) + sum(len(d) for d in drafts)
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows exceed max_rows {self.max_rows}")
        rows: list[int] = []
        live: list[int] = []
        matchers: list[xgr.GrammarMatcher] = []
        row = 0
        for state, draft in zip(states, drafts, strict=True):
            if state is not None and draft:
                rows += self._fill_draft(state, draft, row)
            elif state is not None:
                rows.append(row)
                if state.is_terminated():
                    # xgrammar has no mask past the stop token; eos again is the only safe one.
                    self._allow_only(row, state.stop_token_ids)
                else:
                    live.append(row)
                    matchers.append(state.matcher)
            row += 1 + len(draft)
        if live:
            self._filler.batch_fill_next_token_bitmask(matchers, self._bitmask, live)
        return rows

    def _fill_draft(self, state: GrammarState, draft: Sequence[int], first_row: int) -> list[int]:
        """Fills one sequence's rows: row j for the state after the draft's first j tokens
        (the state itself is unchanged afterwards). Returns the rows filled."""
        rows = []
        accepted = 0
        for j in range(len(draft) + 1):
            row = first_row + j
            rows.append(row)
            if state.is_terminated():
                self._allow_only(row, state.stop_token_ids)
            else:
                state.matcher.fill_next_token_bitmask(self._bitmask, row)
            if j == len(draft) or not state.accept(draft[j]):
                break
            accepted += 1
        if accepted:
            state.matcher.rollback(accepted)
        return rows

    def mask(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The device half of `apply`: masks `rows` of logits [num_rows, vocab_size] in place
        with the bitmask the last `fill` wrote."""
        num_rows = logits.shape[0]
        if logits.shape[1] != self.vocab_size or num_rows > self.max_rows:
            raise ValueError(
                f"logits {tuple(logits.shape)} exceed the bitmask "
                f"[{self.max_rows}, {self.vocab_size}]"
            )
        if rows:
            bitmask = self._on_device(num_rows, logits.device)
            xgr.apply_token_bitmask_inplace(
                logits, bitmask, vocab_size=self.vocab_size, indices=rows
            )
        return logits

    def _on_device(self, num_rows: int, device: torch.device) -> torch.Tensor:
        bitmask = self._bitmask[:num_rows]
        if device.type == "cpu":
            return bitmask
        if self._device_bitmask is None or self._device_bitmask.device != device:
            raise ValueError(f"logits on {device}, but this batch was built for {self.device}")
        device_bitmask = self._device_bitmask[:num_rows]
        device_bitmask.copy_(bitmask, non_blocking=True)
        return device_bitmask

    def _allow_only(self, row: int, token_ids: list[int]) -> None:
        words = self._bitmask[row]
        words.zero_()
        for token_id in token_ids:
            word, bit = divmod(token_id, _BITS_PER_WORD)
            # int32 words: bit 31 is the sign bit, so it is set as the most negative value.
            words[word] |= 1 << bit if bit < _BITS_PER_WORD - 1 else -(1 << bit)
