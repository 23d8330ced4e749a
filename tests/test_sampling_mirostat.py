"""Mirostat v2 holds the average surprise near its target and leaves other rows alone."""

import math

import pytest
import torch

from services.engine.sampler import Sampler
from services.engine.sampling_state import MirostatState, TokenHistory
from services.request_params import SamplingParams

VOCAB = 1000
# Zipf (s = 1) over 1,000 tokens: entropy 7.49 bits, room below it for any target used here.
ZIPF = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float32)
ZIPF_LOGITS = (ZIPF / ZIPF.sum()).log()
NO_HISTORY = TokenHistory(prompt_ids=[], output_ids=[])


def expected_surprise(mu: float, token_id: int) -> float:
    """llama.cpp's step, written out: keep surprise <= mu (at least the top), renormalise."""
    probs = ZIPF_LOGITS.double().softmax(-1)
    keep = -probs.log2() <= mu
    keep[probs.argmax()] = True
    assert keep[token_id], "drew a token outside the truncated set"
    return -math.log2(probs[token_id].item() / probs[keep].sum().item())


@pytest.mark.parametrize(("target", "seed"), [(3.0, None), (5.0, 11)])
def test_average_surprise_converges_to_the_target(target, seed):
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = [SamplingParams(temperature=1.0, seed=seed, mirostat_target=target)]
    state = MirostatState.start(target)
    assert state.mu == 2 * target
    surprises = []
    for position in range(2000):
        mu = state.mu
        token = sampler.sample_tokens(ZIPF_LOGITS[None], params, [position], [NO_HISTORY], [state])
        observed = expected_surprise(mu, token[0].token_id)
        assert state.mu == pytest.approx(mu - 0.1 * (observed - target), abs=1e-4)
        assert math.isfinite(state.mu)
        surprises.append(observed)
    assert abs(sum(surprises) / len(surprises) - target) < 0.5


def test_a_mirostat_row_does_not_change_the_other_rows():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    plain = [SamplingParams(seed=1), SamplingParams(seed=2, top_p=0.8)]
    miro = SamplingParams(seed=3, mirostat_target=4.0, top_k=5)  # mirostat replaces top_k
    alone_state, mixed_state = MirostatState.start(4.0), MirostatState.start(4.0)
    for position in range(20):
        sampler = Sampler(torch.device("cpu"))
        without = sampler.sample_tokens(
            logits[:2], plain, [position] * 2, [NO_HISTORY] * 2, [None] * 2
        )
        alone = sampler.sample_tokens(logits[2:], [miro], [position], [NO_HISTORY], [alone_state])
        mixed = sampler.sample_tokens(
            logits[[0, 2, 1]],
            [plain[0], miro, plain[1]],
            [position] * 3,
            [NO_HISTORY] * 3,
            [None, mixed_state, None],
        )
        assert [t.token_id for t in mixed] == [
            without[0].token_id,
            alone[0].token_id,
            without[1].token_id,
        ]
        assert mixed_state.mu == alone_state.mu


def test_greedy_rows_leave_mirostat_state_alone():
    state = MirostatState.start(3.0)
    params = [SamplingParams(temperature=0.0, mirostat_target=3.0)]
    token = Sampler(torch.device("cpu")).sample_tokens(
        ZIPF_LOGITS[None], params, [0], [NO_HISTORY], [state]
    )
    assert token[0].token_id == 0 and state.mu == 6.0


def test_a_mirostat_row_needs_its_state():
    params = [SamplingParams(mirostat_target=3.0)]
    with pytest.raises(ValueError, match="MirostatState"):
        Sampler(torch.device("cpu")).sample_tokens(
            ZIPF_LOGITS[None], params, [0], [NO_HISTORY], [None]
        )
