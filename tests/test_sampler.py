"""The batched sampler on known distributions."""

import math

import torch

from services.engine.sampler import Sampler, SamplingParams, _apply_top_k, _apply_top_p

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k_keeps_exactly_the_k_most_likely():
    rows = LOGITS.repeat(3, 1)
    out = _apply_top_k(rows, [1, 3, 0])
    assert [kept(r) for r in out] == [[0], [0, 1, 2], [0, 1, 2, 3, 4]]


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    rows = LOGITS.repeat(4, 1)
    out = _apply_top_p(rows, torch.tensor([0.5, 0.6, 0.9, 1.0]))
    assert [kept(r) for r in out] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3, 4]]
    renormalised = out[2].softmax(-1)[:3]
    assert torch.allclose(renormalised, PROBS[:3] / PROBS[:3].sum())


def test_greedy_rows_take_the_argmax_beside_random_rows():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)]
    assert sampler.sample(logits, params, [0, 0]) == [0, 4]


def test_temperature_one_draws_from_the_distribution():
    sampler = Sampler(torch.device("cpu"), seed=0)
    num_draws = 4000
    logits = LOGITS.repeat(num_draws, 1)
    draws = sampler.sample(logits, [SamplingParams(temperature=1.0)] * num_draws, [0] * num_draws)
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / num_draws
    # Five standard errors of a binomial proportion.
    tolerance = 5 * torch.sqrt(PROBS * (1 - PROBS) / num_draws)
    assert ((freq - PROBS).abs() < tolerance).all(), freq


def test_low_temperature_sharpens():
    sampler = Sampler(torch.device("cpu"), seed=0)
    num_draws = 2000
    draws = sampler.sample(
        LOGITS.repeat(num_draws, 1), [SamplingParams(temperature=0.2)] * num_draws, [0] * num_draws
    )
    expected_top = 1 / sum(math.exp((math.log(p) - math.log(0.5)) / 0.2) for p in PROBS.tolist())
    assert abs(draws.count(0) / num_draws - expected_top) < 0.03


def test_seeded_rows_do_not_depend_on_their_batch():
    params = SamplingParams(temperature=1.0, seed=42)
    logits = torch.randn(1, 1000)
    alone = [Sampler(torch.device("cpu")).sample(logits, [params], [p])[0] for p in range(20)]
    others = torch.randn(3, 1000)
    batch = torch.cat([others[:2], logits, others[2:]])
    mixed_params = [SamplingParams(temperature=1.0), SamplingParams(), params, SamplingParams()]
    in_batch = [
        Sampler(torch.device("cpu")).sample(batch, mixed_params, [p] * 4)[2] for p in range(20)
    ]
    assert in_batch == alone
    assert len(set(alone)) > 1  # positions draw differently
