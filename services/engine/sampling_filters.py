"""Truncation filters over temperature-scaled logits: top-k, top-p, min-p, typical-p.

Each filter sets the logits of dropped tokens to -inf and always keeps at least one token.
They run in that order, each on the distribution the previous ones left, and each only on
the rows that ask for it.
"""

from collections.abc import Callable, Sequence

import torch

from services.engine import kernels
from services.request_params import SamplingParams

Filter = Callable[[torch.Tensor, Sequence[float]], torch.Tensor]


def apply_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [num_rows, vocab] after temperature; returns them with filtered tokens at -inf.
    On the CPU our kernel (logit_filters.cpp) runs all four in one pass per row; elsewhere
    each is torch ops over the rows that ask for it."""
    top_ks, top_ps = [p.top_k for p in params], [p.top_p for p in params]
    min_ps, typical_ps = [p.min_p for p in params], [p.typical_p for p in params]
    if kernels.serves(logits):
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps + typical_ps) or any(min_ps):
            logits = torch.ops.llmserve.filter_logits(
                logits,
                torch.tensor(top_ks, dtype=torch.long),
                torch.tensor(top_ps, dtype=torch.float64),
                torch.tensor(min_ps, dtype=torch.float64),
                torch.tensor(typical_ps, dtype=torch.float64),
            )
        return logits
    logits = _where_needed(logits, top_ks, lambda k: k > 0, apply_top_k)
    logits = _where_needed(logits, top_ps, lambda p: p < 1.0, apply_top_p)
    logits = _where_needed(logits, min_ps, lambda p: p > 0.0, apply_min_p)
    return _where_needed(logits, typical_ps, lambda p: p < 1.0, apply_typical_p)


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
    """Keeps the most likely tokens until their mass reaches top_p: a token is dropped when the
    mass of the more likely ones already does (the most likely always stays, and so do the
    tokens tied with the last one kept)."""
    probs = logits.softmax(dim=-1)
    unlikeliness = logits.max(dim=-1, keepdim=True).values - logits  # -log(p / p_max)
    kept = _leading_mass(unlikeliness, probs, _column(top_ps, probs))
    return logits.masked_fill(~kept, float("-inf"))


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
    distance = (-log_probs - entropy).abs()  # inf for dropped tokens, which come last
    kept = _leading_mass(distance, probs, _column(typical_ps, probs))
    return logits.masked_fill(~kept, float("-inf"))


# On the CPU _leading_mass sorts only the tokens in the leading buckets of its key:
# quarter-nat wide, the last one holding every larger key. The buckets' float32 sums are
# short of the exact mass by far less than the margin, so the buckets chosen always hold it.
_BUCKETS_PER_NAT = 4
_NUM_BUCKETS = 256
_MASS_MARGIN = 1e-4
# Mass within this share of the target counts as reaching it: sums in floats cannot tell them
# apart (0.5 + 0.25 + 0.15 reaches 0.9). logit_filters.cpp does the same.
_REACHED_SHARE = 1 - 1e-6


def _leading_mass(keys: torch.Tensor, probs: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """Which tokens to keep, taking them in increasing `keys` order (>= 0; inf for dropped
    tokens) until their probability mass reaches each row's `masses` [rows, 1]: a token is
    dropped when the mass before it already does. The first token always stays, and so do
    tokens tied with the last one kept.

    On the CPU a full sort of the vocabulary took 3.7 ms a row, so only the tokens of the
    leading buckets of `keys` that together reach the mass are sorted. A GPU sorts a row in
    microseconds, and finding the buckets' sizes would stop it for the host, so there every
    row is sorted whole. Every sum runs within its row in a fixed order, so a row's result
    does not depend on its batch.
    """
    if _sorts_whole_rows(keys.device):
        sorted_keys, order = keys.sort(dim=-1, stable=True)
        sorted_mass, counts = probs.gather(-1, order).double(), None
    else:
        sorted_keys, sorted_mass, counts = _sorted_candidates(keys, probs, masses)
    before = sorted_mass.cumsum(dim=-1) - sorted_mass
    num_kept = (before < masses * _REACHED_SHARE).sum(dim=-1, keepdim=True).clamp(min=1)
    if counts is not None:
        num_kept = num_kept.minimum(counts[:, None])
    return keys <= sorted_keys.gather(-1, num_kept - 1)


def _sorts_whole_rows(device: torch.device) -> bool:
    return device.type != "cpu"


def _sorted_candidates(
    keys: torch.Tensor, probs: torch.Tensor, masses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys and masses (float64) of each row's tokens in the leading buckets that hold
    its mass, sorted by key and padded with inf keys of no mass, and how many each row has."""
    num_rows, device = keys.shape[0], keys.device
    offsets = torch.arange(num_rows, dtype=torch.int32, device=device)[:, None] * _NUM_BUCKETS
    # (A NaN key, from a row of NaN logits, goes to the last bucket.)
    scaled = (keys * _BUCKETS_PER_NAT).clamp_(max=_NUM_BUCKETS - 1).nan_to_num_(_NUM_BUCKETS - 1)
    buckets = scaled.int().add_(offsets)
    bucket_mass = torch.bincount(
        buckets.flatten(), weights=probs.flatten(), minlength=num_rows * _NUM_BUCKETS
    ).view(num_rows, _NUM_BUCKETS)
    reached = bucket_mass.double().cumsum(dim=-1) >= masses + _MASS_MARGIN
    reached[:, -1] = True
    rows, columns = (buckets <= reached.int().argmax(dim=-1, keepdim=True) + offsets).nonzero(
        as_tuple=True
    )
    counts = torch.bincount(rows, minlength=num_rows)
    slots = torch.arange(len(rows), device=device) - (counts.cumsum(dim=0) - counts)[rows]
    width = int(counts.max())
    keys_of = torch.full((num_rows, width), float("inf"), dtype=keys.dtype, device=device)
    keys_of[rows, slots] = keys[rows, columns]
    mass_of = torch.zeros((num_rows, width), dtype=torch.float64, device=device)
    mass_of[rows, slots] = probs[rows, columns].double()
    sorted_keys, order = keys_of.sort(dim=-1, stable=True)
    return sorted_keys, mass_of.gather(-1, order), counts


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]
