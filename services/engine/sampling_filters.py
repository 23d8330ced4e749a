"""Truncation filters over temperature-scaled logits: top-k, top-p, min-p, typical-p.

Each filter sets the logits of dropped tokens to -inf and always keeps at least one token.
They run in that order, each on the distribution the previous ones left, and each only on
the rows that ask for it.
"""

from collections.abc import Callable, Sequence

import torch

from services.request_params import SamplingParams

Filter = Callable[[torch.Tensor, Sequence[float]], torch.Tensor]


def apply_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [num_rows, vocab] after temperature; returns them with filtered tokens at -inf."""
    logits = _where_needed(logits, [p.top_k for p in params], lambda k: k > 0, apply_top_k)
    logits = _where_needed(logits, [p.top_p for p in params], lambda p: p < 1.0, apply_top_p)
    logits = _where_needed(logits, [p.min_p for p in params], lambda p: p > 0.0, apply_min_p)
    typical = [p.typical_p for p in params]
    return _where_needed(logits, typical, lambda p: p < 1.0, apply_typical_p)


def _where_needed(
    logits: torch.Tensor,
    values: list[float] | list[int],
    needed: Callable[[float], bool],
    fn: Filter,
) -> torch.Tensor:
    rows = [i for i, v in enumerate(values) if needed(v)]
    if not rows:
        return logits
    if len(rows) == len(values):
        return fn(logits, values)
    index = torch.tensor(rows, device=logits.device)
    return logits.index_copy(0, index, fn(logits[index], [values[i] for i in rows]))


def apply_top_k(logits: torch.Tensor, top_ks: Sequence[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [int(k) if 0 < k < vocab else vocab for k in top_ks]
    top = logits.topk(max(ks), dim=-1).values  # [num_rows, max_k], descending
    kth = top.gather(-1, torch.tensor(ks, device=logits.device)[:, None] - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_ps: Sequence[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the top token always stays.
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= _column(top_ps, logits)
    drop[:, 0] = False  # top_p = 0 would otherwise drop everything
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_ps: Sequence[float]) -> torch.Tensor:
    """Drops tokens less likely than min_p times the most likely one. The ratio does not change
    under renormalisation, so it is compared on logits: log p - log p_max < log min_p."""
    gap = logits - logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(gap < _column(min_ps, logits).log(), float("-inf"))


def apply_typical_p(logits: torch.Tensor, typical_ps: Sequence[float]) -> torch.Tensor:
    """Locally typical sampling: keeps the smallest set of tokens, taken in order of how close
    their surprise -log p lies to the entropy, whose probability mass reaches typical_p."""
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    # Dropped tokens have p = 0 and log p = -inf; their 0 * -inf terms are NaN, hence nansum.
    entropy = -(probs * log_probs).nansum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()  # inf for dropped tokens, which sort last
    _, order = distance.sort(dim=-1)
    sorted_probs = probs.gather(-1, order)
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= _column(typical_ps, logits)
    drop[:, 0] = False  # typical_p = 0 keeps the most typical token alone
    return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]
