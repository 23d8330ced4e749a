"""Batched next-token sampling: greedy, temperature, top-k, top-p, seeded draws."""

from dataclasses import dataclass

import torch

# Keeps (seed, position) pairs apart when folded into one generator seed.
_POSITION_STRIDE = 1_000_003


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Samples one token per row. Rows with a seed draw from a generator seeded by
    (seed, position), so a seeded request's output does not depend on its batch."""

    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.seed() if seed is None else self._shared.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
    ) -> list[int]:
        """logits: [num_rows, vocab] float32; positions: index of the token being sampled."""
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not random_rows:
            return greedy.tolist()
        rows = torch.tensor(random_rows, device=self.device)
        chosen = [params[i] for i in random_rows]
        probs = self._filtered_probs(logits[rows], chosen)
        noise = self._exponential_noise(probs.shape, chosen, [positions[i] for i in random_rows])
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws exactly from p.
        greedy[rows] = (probs / noise).argmax(dim=-1)
        return greedy.tolist()

    def _filtered_probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], device=self.device)
        logits = logits / temps[:, None]
        top_ks = [p.top_k for p in params]
        if any(k > 0 for k in top_ks):
            logits = _apply_top_k(logits, top_ks)
        top_ps = [p.top_p for p in params]
        if any(p < 1.0 for p in top_ps):
            logits = _apply_top_p(logits, torch.tensor(top_ps, device=self.device))
        return torch.softmax(logits, dim=-1)

    def _exponential_noise(
        self, shape: torch.Size, params: list[SamplingParams], positions: list[int]
    ) -> torch.Tensor:
        noise = torch.empty(shape, device=self.device)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            draws = torch.empty(len(unseeded), shape[1], device=self.device)
            draws.exponential_(generator=self._shared)
            noise[unseeded] = draws
        for i, p in enumerate(params):
            if p.seed is not None:
                self._seeded.manual_seed((p.seed * _POSITION_STRIDE + positions[i]) % 2**63)
                noise[i].exponential_(generator=self._seeded)
        return noise


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
    top = logits.topk(int(ks.max()), dim=-1).values  # [rows, max_k], descending
    kth = top.gather(-1, (ks - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the top token always stays.
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
