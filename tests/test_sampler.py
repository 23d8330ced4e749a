"""The batched sampler on known distributions."""

import math

import pytest
import torch

from services.engine import kernels, sampling_filters
from services.engine.sampler import Sampler, invert_cdf
from services.engine.sampling_filters import apply_filters
from services.request_params import SamplingParams

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


@pytest.fixture(params=["kernel", "torch", "torch-whole-rows"])
def filters_path(request, monkeypatch):
    """Top-k, top-p and min-p by our CPU kernel, or by torch ops: bucketed as on a CPU without
    the kernels, or sorting whole rows as on a GPU (typical-p too)."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("CPU kernels did not build")
    if request.param.startswith("torch"):
        monkeypatch.setattr(sampling_filters.kernels, "serves", lambda tensor: False)
    if request.param == "torch-whole-rows":
        monkeypatch.setattr(sampling_filters, "_sorts_whole_rows", lambda device: True)
    return request.param


def filtered(logits: torch.Tensor, **values: list) -> torch.Tensor:
    """apply_filters with one SamplingParams per row from `values` (e.g. top_p=[0.5, 0.9])."""
    names = list(values)
    params = [
        SamplingParams(**dict(zip(names, row, strict=True)))
        for row in zip(*values.values(), strict=True)
    ]
    return apply_filters(logits, params)


def test_top_k_keeps_exactly_the_k_most_likely(filters_path):
    rows = LOGITS.repeat(3, 1)
    out = filtered(rows, top_k=[1, 3, 0])
    assert [kept(r) for r in out] == [[0], [0, 1, 2], [0, 1, 2, 3, 4]]


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises(filters_path):
    rows = LOGITS.repeat(4, 1)
    out = filtered(rows, top_p=[0.5, 0.6, 0.9, 1.0])
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


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_and_renormalises(filters_path):
    rows = LOGITS.repeat(3, 1)
    # Thresholds 0.1, 0.175 and 0.5 * p_max = 0.5.
    out = filtered(rows, min_p=[0.2, 0.35, 1.0])
    assert [kept(r) for r in out] == [[0, 1, 2], [0, 1], [0]]
    assert torch.allclose(out[0].softmax(-1)[:3], PROBS[:3] / PROBS[:3].sum())
    assert torch.allclose(out[1].softmax(-1)[:2], torch.tensor([2 / 3, 1 / 3]))


def test_typical_p_keeps_the_tokens_whose_surprise_is_closest_to_the_entropy(filters_path):
    # Entropy of PROBS is 1.2691 nats; |-ln p - H| per token is
    # 0.5760, 0.1172, 0.6280, 1.3902, 2.2375, so the typical order is 1, 0, 2, 3, 4 with
    # cumulative mass 0.25, 0.75, 0.90, 0.97, 1.0. The most likely token is not the most typical.
    rows = LOGITS.repeat(4, 1)
    out = filtered(rows, typical_p=[0.2, 0.5, 0.8, 0.95])
    assert [kept(r) for r in out] == [[1], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert torch.allclose(out[1].softmax(-1)[:2], torch.tensor([2 / 3, 1 / 3]))


def test_filters_touch_only_the_rows_that_ask():
    rows = LOGITS.repeat(3, 1)
    params = [SamplingParams(min_p=0.2), SamplingParams(), SamplingParams(typical_p=0.2)]
    out = apply_filters(rows, params)
    assert [kept(r) for r in out] == [[0, 1, 2], [0, 1, 2, 3, 4], [1]]


def test_min_p_of_one_is_greedy():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 1000, generator=generator) * 3
    top2 = logits.topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) > 0.01).all()  # no near ties, so 0.999 behaves like 1
    sampler = Sampler(torch.device("cpu"), seed=0)
    for min_p in (1.0, 0.999):
        params = [SamplingParams(temperature=1.0, min_p=min_p)] * 16
        assert sampler.sample(logits, params, [0] * 16) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(min_p=0.2), PROBS[:3] / PROBS[:3].sum()),
        (SamplingParams(typical_p=0.5), torch.tensor([2 / 3, 1 / 3])),
        (SamplingParams(top_k=4, top_p=0.9), PROBS[:3] / PROBS[:3].sum()),
    ],
)
def test_draws_come_from_the_filtered_renormalised_distribution(params, expected):
    sampler = Sampler(torch.device("cpu"), seed=0)
    num_draws = 4000
    draws = sampler.sample(LOGITS.repeat(num_draws, 1), [params] * num_draws, [0] * num_draws)
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / num_draws
    expected = torch.cat([expected, torch.zeros(5 - len(expected))])
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / num_draws)
    assert ((freq - expected).abs() <= tolerance).all(), freq


def test_inverting_a_large_vocabulary_draws_each_token_with_its_probability():
    """Mass spread over blocks of the two-level inversion, zeros between, a block boundary."""
    generator = torch.Generator().manual_seed(3)
    probs = torch.zeros(1000)
    support = torch.tensor([0, 255, 256, 300, 511, 512, 999])
    probs[support] = torch.tensor([0.05, 0.2, 0.1, 0.3, 0.15, 0.05, 0.15])
    num_draws = 20000
    uniform = 1 - torch.rand(num_draws, generator=generator, dtype=torch.float64)
    draws = invert_cdf(probs.repeat(num_draws, 1), uniform)
    assert set(draws.tolist()) <= set(support.tolist())
    freq = torch.bincount(draws, minlength=1000).float()[support] / num_draws
    expected = probs[support]
    assert ((freq - expected).abs() <= 5 * torch.sqrt(expected * (1 - expected) / num_draws)).all()
    # The extremes of u land on the first and last tokens with mass.
    ends = invert_cdf(probs.repeat(2, 1), torch.tensor([1e-12, 1.0], dtype=torch.float64))
    assert ends.tolist() == [0, 999]


def reference_leading_mass(probs: torch.Tensor, order_keys: torch.Tensor, mass: float) -> set:
    """The tokens a full sort by `order_keys` keeps: taken in increasing order until the mass
    before the next one reaches `mass` (the first always stays), summed in float64."""
    kept, total = set(), 0.0
    for token in order_keys.argsort(stable=True).tolist():
        if kept and total >= mass:
            break
        kept.add(token)
        total += probs[token].double().item()
    return kept


def between_sorts(kept_tokens: list[int], probs, order_keys, mass: float) -> bool:
    """Whether `kept_tokens` is what a full sort keeps, up to sums a millionth apart: at least
    what it keeps for a slightly smaller mass, at most what it keeps for a slightly larger."""
    fewest = reference_leading_mass(probs, order_keys, mass * (1 - 1e-5))
    most = reference_leading_mass(probs, order_keys, mass * (1 + 1e-5))
    return fewest <= set(kept_tokens) <= most


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_top_p_and_typical_p_keep_what_a_full_sort_keeps_whatever_the_batch(scale, filters_path):
    """Flat to peaked rows over a real vocabulary size, some tokens already dropped: the same
    tokens as sorting the whole vocabulary, and a row alone keeps what it keeps in a batch."""
    generator = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(6, 49152, generator=generator) * scale
    logits[1, 100:] = float("-inf")  # after top-k
    logits[2, :3] = logits[2].max() + 1  # a tie at the top
    masses = [0.1, 0.5, 0.9, 0.95, 0.99, 0.0]
    top_p, typical = filtered(logits, top_p=masses), filtered(logits, typical_p=masses)
    for row, mass in enumerate(masses):
        probs = logits[row].softmax(-1)
        assert between_sorts(kept(top_p[row]), probs, -logits[row], mass), (row, mass)
        distance = typical_distance(logits[row], filters_path)
        assert between_sorts(kept(typical[row]), probs, distance, mass), (row, mass)
        alone = logits[row : row + 1]
        assert torch.equal(filtered(alone, top_p=[mass])[0], top_p[row])
        assert torch.equal(filtered(alone, typical_p=[mass])[0], typical[row])


def typical_distance(logits: torch.Tensor, filters_path: str) -> torch.Tensor:
    """How far each token's surprise -log p lies from the entropy, as each path computes it:
    torch from log_softmax in float32; the kernel as |E_p[logit] - logit| in float64 (the same
    quantity: -log p = lse - logit and H = lse - E_p[logit])."""
    if filters_path == "kernel":
        logits = logits.double()
        center = (logits.softmax(-1) * logits).nansum()
        return (center - logits).abs()
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).nansum()
    return (-log_probs - entropy).abs()


def test_filters_on_a_row_of_nan_logits_do_not_fail(filters_path):
    logits = torch.stack([LOGITS, torch.full((5,), float("nan"))])
    out = filtered(logits, top_k=[3, 3], top_p=[0.6, 0.6], min_p=[0.1, 0.1])
    assert kept(out[0]) == [0, 1]


def test_the_kernel_filters_as_torch_does_in_combination(monkeypatch):
    """top-k, then top-p on what top-k left, then min-p, then typical-p: the same tokens both
    ways (top-p and typical-p within their sums' rounding), each row alone as in its batch."""
    if not kernels.available():
        pytest.skip("CPU kernels did not build")
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 49152, generator=generator) * torch.linspace(0.5, 12, 8)[:, None]
    values = {
        "top_k": [0, 40, 1, 49152, 5, 100, 0, 50],
        "top_p": [1.0, 1.0, 0.9, 0.95, 1.0, 0.5, 0.8, 0.95],
        "min_p": [0.05, 0.0, 0.0, 0.1, 0.5, 0.01, 0.0, 0.05],
        "typical_p": [1.0, 0.9, 1.0, 0.95, 0.5, 1.0, 0.2, 0.99],
    }
    ours = filtered(logits, **values)
    for row in range(8):
        alone = filtered(logits[row : row + 1], **{k: [v[row]] for k, v in values.items()})
        assert torch.equal(alone[0], ours[row])
    monkeypatch.setattr(sampling_filters.kernels, "serves", lambda tensor: False)
    theirs = filtered(logits, **values)
    for row in range(8):
        difference = set(kept(ours[row])) ^ set(kept(theirs[row]))
        ranked = values["top_p"][row] < 1 or values["typical_p"][row] < 1
        assert len(difference) <= (1 if ranked else 0), (row, difference)
