"""Logprobs come from the raw logits, whatever temperature, bias or penalties did."""

import pytest
import torch

from services.engine.sampler import Sampler
from services.engine.sampling_state import TokenHistory
from services.request_params import SamplingParams

NUM_ROWS = 4


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(NUM_ROWS, 100, generator=torch.Generator().manual_seed(5)) * 2


def sample(logits: torch.Tensor, params: list[SamplingParams], seed: int = 0):
    history = TokenHistory(prompt_ids=[1, 2, 3], output_ids=[4, 4])
    return Sampler(torch.device("cpu"), seed=seed).sample_tokens(
        logits, params, [7] * len(params), [history] * len(params), [None] * len(params)
    )


def test_logprob_is_the_raw_log_softmax_of_the_sampled_token(logits):
    params = [
        SamplingParams(temperature=0.3, logprobs=True, logit_bias={5: 4.0}),
        SamplingParams(temperature=1.7, top_p=0.5, logprobs=True, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, logprobs=True, presence_penalty=2.0),
        SamplingParams(temperature=1.0, min_p=0.1, typical_p=0.9, frequency_penalty=1.0),
    ]
    sampled = sample(logits, params)
    expected = logits.log_softmax(-1)
    for row in range(3):
        token = sampled[row]
        assert token.logprob == pytest.approx(expected[row, token.token_id].item(), abs=1e-6)
        assert token.top == []
    assert sampled[3].logprob is None and sampled[3].top == []


@pytest.mark.parametrize("num_top", [1, 3, 5])
def test_top_logprobs_are_sorted_and_independent_of_how_the_token_was_drawn(logits, num_top):
    expected = logits.log_softmax(-1).topk(num_top, dim=-1)
    plain = [SamplingParams(top_logprobs=num_top)] * NUM_ROWS
    shaped = [
        SamplingParams(temperature=t, top_logprobs=num_top, logit_bias={0: -50.0}, top_k=3)
        for t in (0.0, 0.2, 1.0, 2.0)
    ]
    for params in (plain, shaped):
        for row, token in enumerate(sample(logits, params)):
            assert len(token.top) == num_top
            assert [i for i, _ in token.top] == expected.indices[row].tolist()
            values = [v for _, v in token.top]
            assert values == sorted(values, reverse=True)
            assert values == pytest.approx(expected.values[row].tolist(), abs=1e-6)
            assert token.logprob is not None  # top_logprobs alone implies the token's own


def test_rows_ask_for_different_numbers_of_alternatives(logits):
    params = [SamplingParams(top_logprobs=k, logprobs=True) for k in (0, 2, 5, 1)]
    assert [len(t.top) for t in sample(logits, params)] == [0, 2, 5, 1]
