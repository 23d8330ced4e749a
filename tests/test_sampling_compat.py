"""Sampler.sample() draws exactly what it drew before the extended parameters existed: the
same filtering of temperature, top-k and top-p, the same random numbers, the same draw."""

import torch

from services.engine.sampler import Sampler, invert_cdf
from services.request_params import SamplingParams

_POSITION_STRIDE = 1_000_003


class ReferenceSampler:
    """The sampler as it was: temperature, top-k, top-p and seeds only."""

    def __init__(self, seed: int) -> None:
        self._shared = torch.Generator().manual_seed(seed)
        self._seeded = torch.Generator()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]):
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not random_rows:
            return greedy.tolist()
        rows = torch.tensor(random_rows)
        chosen = [params[i] for i in random_rows]
        scaled = logits[rows] / torch.tensor([p.temperature for p in chosen])[:, None]
        vocab = scaled.shape[-1]
        if any(p.top_k > 0 for p in chosen):
            ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in chosen])
            kth = scaled.topk(int(ks.max()), dim=-1).values.gather(-1, (ks - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in chosen):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            top_ps = torch.tensor([p.top_p for p in chosen])[:, None]
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_ps
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
        probs = scaled.softmax(dim=-1)
        uniform = 1 - torch.rand(len(chosen), generator=self._shared, dtype=torch.float64)
        for i, p in enumerate(chosen):
            if p.seed is not None:
                position = positions[random_rows[i]]
                self._seeded.manual_seed((p.seed * _POSITION_STRIDE + position) % 2**63)
                uniform[i] = 1 - torch.rand(1, generator=self._seeded, dtype=torch.float64)
        greedy[rows] = invert_cdf(probs, uniform)
        return greedy.tolist()


def test_old_parameters_sample_as_before():
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=7),
        SamplingParams(top_k=1),
        SamplingParams(temperature=1.0, seed=123),
        SamplingParams(temperature=0.5, top_p=0.95),
    ]
    generator = torch.Generator().manual_seed(9)
    new, old = Sampler(torch.device("cpu"), seed=4), ReferenceSampler(seed=4)
    for step in range(30):
        logits = torch.randn(len(params), 500, generator=generator) * 2
        # Alternate the whole batch with a subset, as decode steps do.
        batch = params if step % 2 else params[2:5]
        rows = logits[: len(batch)]
        positions = [step + i for i in range(len(batch))]
        assert new.sample(rows, batch, positions) == old.sample(rows, batch, positions)


def test_all_greedy_batches_take_the_argmax():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0)] * 5
    assert (
        Sampler(torch.device("cpu")).sample(logits, params, [0] * 5) == logits.argmax(-1).tolist()
    )
