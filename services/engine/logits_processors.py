"""Logit bias and repetition / frequency / presence penalties, batched over rows.

Every function returns a new tensor and leaves its input alone: the sampler reads logprobs
from the raw logits after these have run. Rows that do not ask for a feature are untouched,
and the count tensors are built only for the rows that do.
"""

from collections.abc import Sequence

import torch

from services.engine.sampling_state import TokenHistory
from services.request_params import SamplingParams


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
    presence penalties over output tokens only (subtracted, OpenAI's definition). Only the
    logits of the tokens seen are read and written (a pass over the whole vocabulary per
    penalty took 5 ms for 16 rows on a CPU core)."""
    rep_rows = [
        i
        for i, p in enumerate(params)
        if p.needs_repetition_penalty and (histories[i].prompt_ids or histories[i].output_ids)
    ]
    out_rows = [
        i for i, p in enumerate(params) if p.needs_output_penalties and histories[i].output_ids
    ]
    if not rep_rows and not out_rows:
        return logits
    logits = logits.clone()
    device, dtype = logits.device, logits.dtype
    if rep_rows:
        seqs = [(*histories[i].prompt_ids, *histories[i].output_ids) for i in rep_rows]
        ids, _ = _padded_ids(seqs, device)
        rows = torch.tensor(rep_rows, device=device)[:, None]
        penalty = torch.tensor([params[i].repetition_penalty for i in rep_rows], device=device)
        penalty = penalty.to(dtype)[:, None]
        seen = logits[rows, ids]
        logits[rows, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if out_rows:
        ids, real = _padded_ids([histories[i].output_ids for i in out_rows], device)
        rows = torch.tensor(out_rows, device=device)[:, None]
        counts = _counts(ids, real, len(out_rows), logits.shape[-1], dtype).gather(1, ids)
        frequency = [params[i].frequency_penalty for i in out_rows]
        presence = [params[i].presence_penalty for i in out_rows]
        frequency = torch.tensor(frequency, device=device, dtype=dtype)[:, None]
        presence = torch.tensor(presence, device=device, dtype=dtype)[:, None]
        seen = logits[rows, ids]
        logits[rows, ids] = seen - frequency * counts - presence * (counts > 0).to(dtype)
    return logits


def token_counts(seqs: Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """How often each token occurs in each row's sequence: [num_rows, vocab], like's dtype and
    device."""
    num_rows, vocab = like.shape
    ids, real = _padded_ids(seqs, like.device)
    return _counts(ids, real, num_rows, vocab, like.dtype)


def _padded_ids(
    seqs: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token ids side by side, [num_rows, width], padded with the row's first id
    (0 for an empty row), and which entries are real: a padded entry reads and writes the
    same token as a real one, with the same value, and counts for nothing."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)  # on host
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            ids[row, len(seq) :] = seq[0]
    lengths = torch.tensor([len(s) for s in seqs])
    real = torch.arange(width)[None, :] < lengths[:, None]
    return ids.to(device, non_blocking=True), real.to(device, non_blocking=True)


def _counts(
    ids: torch.Tensor, real: torch.Tensor, num_rows: int, vocab: int, dtype: torch.dtype
) -> torch.Tensor:
    """[num_rows, vocab]: how often each token is among a row's real `ids`."""
    counts = torch.zeros(num_rows, vocab, dtype=dtype, device=ids.device)
    return counts.scatter_add_(1, ids, real.to(dtype))
