"""Mirostat v2 (llama.cpp's algorithm), batched over the rows that use it.

Each step keeps the tokens whose surprise -log2 p is at most mu (at least the most likely
one), renormalises, and draws from what is left; the draw's surprise under the renormalised
distribution then moves mu toward the target: mu -= lr * (observed - target). For these rows
it replaces top-k, top-p, min-p and typical-p.
"""

import torch

from services.engine.sampling_state import MirostatState


def truncated_probs(logits: torch.Tensor, mus: list[float]) -> torch.Tensor:
    """logits: [num_rows, vocab] after temperature; returns the renormalised distribution over
    the tokens with surprise <= mu, in vocabulary order, [num_rows, vocab]."""
    probs = logits.softmax(dim=-1)
    mu = torch.tensor(mus, dtype=probs.dtype, device=probs.device)[:, None]
    # Surprise grows as p falls, so this is llama.cpp's cut of the sorted list, without a sort.
    keep = -torch.log2(probs) <= mu
    keep.scatter_(-1, probs.argmax(dim=-1, keepdim=True), True)
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


def observed_surprise(probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """probs: [num_rows, vocab] from truncated_probs; token_ids: [num_rows] drawn from them."""
    return -torch.log2(probs.gather(-1, token_ids[:, None]).squeeze(-1))


def update(state: MirostatState, target: float, lr: float, surprise: float) -> None:
    state.mu -= lr * (surprise - target)
