"""Logit bias and repetition / frequency / presence penalties, batched over rows.

Every function returns a new tensor and leaves its input alone: the sampler reads logprobs
from the raw logits after these have run. Rows that do not ask for a feature are untouched,
and the count tensors are built only for the rows that do.
"""

from collections.abc import Callable, Sequence

import torch

from services.engine.sampling_state import TokenHistory
from services.request_params import SamplingParams

Penalty = Callable[[torch.Tensor, list[SamplingParams], list[TokenHistory]], torch.Tensor]


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [num_rows, vocab]; adds each row's bias to its tokens' logits."""
    if not any(p.logit_bias for p in params):
        return logits
    vocab = logits.shape[-1]
    rows: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    # One entry per biased token: a rare feature with small maps. validate() rejects ids
    # outside the vocabulary; they are skipped here so that one unchecked request cannot fail
    # a whole batch step with a device-side indexing error.
    for row, p in enumerate(params):
        for token_id, value in p.logit_bias.items():
            if 0 <= token_id < vocab:
                rows.append(row)
                token_ids.append(token_id)
                values.append(value)
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(token_ids, device=device))
    bias = torch.tensor(values, dtype=logits.dtype, device=device)
    return logits.index_put(index, bias, accumulate=True)


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory]
) -> torch.Tensor:
    """logits: [num_rows, vocab]. Repetition penalty over prompt and output tokens (divides
    positive logits, multiplies negative ones, once per distinct token), then frequency and
    presence penalties over output tokens only (subtracted, OpenAI's definition)."""
    rep_rows = [i for i, p in enumerate(params) if p.needs_repetition_penalty]
    if rep_rows:
        logits = _on_rows(logits, rep_rows, params, histories, _repetition)
    out_rows = [i for i, p in enumerate(params) if p.needs_output_penalties]
    if out_rows:
        logits = _on_rows(logits, out_rows, params, histories, _frequency_presence)
    return logits


def _on_rows(
    logits: torch.Tensor,
    rows: list[int],
    params: list[SamplingParams],
    histories: list[TokenHistory],
    penalty: Penalty,
) -> torch.Tensor:
    index = torch.tensor(rows, device=logits.device)
    penalised = penalty(logits[index], [params[i] for i in rows], [histories[i] for i in rows])
    return logits.index_copy(0, index, penalised)


def _repetition(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory]
) -> torch.Tensor:
    counts = token_counts([h.prompt_ids for h in histories], logits)
    counts += token_counts([h.output_ids for h in histories], logits)
    penalty = torch.tensor([p.repetition_penalty for p in params], device=logits.device)
    penalty = penalty.to(logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalised, logits)


def _frequency_presence(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory]
) -> torch.Tensor:
    counts = token_counts([h.output_ids for h in histories], logits)
    device, dtype = logits.device, logits.dtype
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device, dtype=dtype)
    presence = torch.tensor([p.presence_penalty for p in params], device=device, dtype=dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(dtype)


def token_counts(seqs: Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """How often each token occurs in each row's sequence: [num_rows, vocab], like's dtype and
    device. One scatter_add over ids padded with an extra column that is dropped afterwards."""
    num_rows, vocab = like.shape
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((num_rows, width), vocab, dtype=torch.long)  # [num_rows, width], on host
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    ids = ids.to(like.device, non_blocking=True)
    counts = torch.zeros(num_rows, vocab + 1, dtype=like.dtype, device=like.device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=like.dtype, device=like.device))
    return counts[:, :vocab]
