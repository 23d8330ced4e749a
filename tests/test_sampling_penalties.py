"""Logit bias and repetition / frequency / presence penalties, on exact logits."""

import torch

from services.engine.logits_processors import apply_logit_bias, apply_penalties, token_counts
from services.engine.sampler import Sampler
from services.engine.sampling_state import TokenHistory
from services.request_params import SamplingParams

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()
# Powers of two keep every expected value below exact in float32.
ROW = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
HISTORY = TokenHistory(prompt_ids=[0, 3, 3], output_ids=[1, 1, 4])
NO_HISTORY = TokenHistory(prompt_ids=[], output_ids=[])


def sample_tokens(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams]):
    num_rows = len(params)
    histories = [NO_HISTORY] * num_rows
    return sampler.sample_tokens(logits, params, [0] * num_rows, histories, [None] * num_rows)


def test_token_counts_ignore_padding_and_count_repeats():
    counts = token_counts([[1, 1, 4], [], [0]], torch.zeros(3, 5))
    assert counts.tolist() == [[0, 2, 0, 0, 1], [0] * 5, [1, 0, 0, 0, 0]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    out = apply_penalties(ROW[None], [SamplingParams(repetition_penalty=2.0)], [HISTORY])
    # Seen: 0 and 3 (prompt), 1 and 4 (output), each once however often it occurs.
    assert out[0].tolist() == [1.0, -2.0, 0.5, 1.5, -4.0]


def test_repetition_penalty_below_one_rewards_repeats():
    out = apply_penalties(ROW[None], [SamplingParams(repetition_penalty=0.5)], [HISTORY])
    assert out[0].tolist() == [4.0, -0.5, 0.5, 6.0, -1.0]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(ROW[None], [params], [HISTORY])
    # Token 1 twice: -1 - 2 * 0.5 - 0.25; token 4 once: -2 - 0.5 - 0.25; prompt tokens untouched.
    assert out[0].tolist() == [2.0, -2.25, 0.5, 3.0, -2.75]


def test_penalties_apply_in_order_and_only_to_rows_that_ask():
    rows = ROW.repeat(4, 1)
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.0),  # 0 disables, like 1
        SamplingParams(presence_penalty=-1.0),
    ]
    before = rows.clone()
    out = apply_penalties(rows, params, [HISTORY] * 4)
    assert out[0].tolist() == [1.0, -4.0, 0.5, 1.5, -5.0]
    assert out[1].tolist() == ROW.tolist()
    assert out[2].tolist() == ROW.tolist()
    assert out[3].tolist() == [2.0, 0.0, 0.5, 3.0, -1.0]
    assert torch.equal(rows, before)  # the input is never written


def test_penalties_steer_a_greedy_row():
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=2.0)]
    history = [TokenHistory(prompt_ids=[2], output_ids=[3, 3, 0])]
    sampled = sampler.sample_tokens(ROW[None], params, [0], history, [None])
    assert sampled[0].token_id == 2  # tokens 3 and 0 fall to -1, below token 2's 0.5


def test_logit_bias_adds_to_the_named_tokens_only():
    params = [SamplingParams(logit_bias={1: 1.5, 4: -0.5}), SamplingParams()]
    out = apply_logit_bias(ROW.repeat(2, 1), params)
    assert out[0].tolist() == [2.0, 0.5, 0.5, 3.0, -2.5]
    assert out[1].tolist() == ROW.tolist()


def test_logit_bias_plus_100_forces_a_token():
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = [SamplingParams(temperature=1.5, logit_bias={4: 100.0})] * 500
    sampled = sample_tokens(sampler, LOGITS.repeat(500, 1), params)
    assert {t.token_id for t in sampled} == {4}


def test_logit_bias_minus_100_bans_even_the_argmax():
    sampler = Sampler(torch.device("cpu"), seed=0)
    num_draws = 2000
    params = [SamplingParams(temperature=1.0, logit_bias={0: -100.0})] * num_draws
    sampled = sample_tokens(sampler, LOGITS.repeat(num_draws, 1), params)
    assert 0 not in {t.token_id for t in sampled}
    greedy = [SamplingParams(temperature=0.0, logit_bias={0: -100.0})]
    assert sample_tokens(sampler, LOGITS[None], greedy)[0].token_id == 1


def test_logit_bias_moves_a_greedy_rows_argmax():
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = [SamplingParams(top_k=1, logit_bias={2: 1.5}), SamplingParams(top_k=1)]
    sampled = sample_tokens(sampler, LOGITS.repeat(2, 1), params)
    # log 0.15 + 1.5 = -0.397 beats log 0.5 = -0.693.
    assert [t.token_id for t in sampled] == [2, 0]


def test_logit_bias_outside_the_vocabulary_is_skipped():
    out = apply_logit_bias(ROW[None], [SamplingParams(logit_bias={5: 10.0, 0: 1.0})])
    assert out[0].tolist() == [3.0, -1.0, 0.5, 3.0, -2.0]


def test_penalties_over_a_real_vocabulary_match_the_dense_formulas():
    """Long histories with repeats, a row with no output yet, rows without penalties: the
    tokens seen are penalised as the whole-vocabulary formulas say, bitwise, the rest kept."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 49152, generator=generator) * 4
    histories = [
        TokenHistory(torch.randint(0, 49152, (900,), generator=generator).tolist(), [7, 7, 9]),
        TokenHistory([5, 6], []),
        TokenHistory([1], torch.randint(0, 300, (500,), generator=generator).tolist()),
        TokenHistory([2, 3], [4]),
    ]
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=1.0),
        SamplingParams(frequency_penalty=-0.5, presence_penalty=1.5),
        SamplingParams(),
    ]
    assert torch.equal(apply_penalties(logits, params, [NO_HISTORY] * 4), logits)
    expected = logits.clone()
    for row, (p, history) in enumerate(zip(params, histories, strict=True)):
        x = expected[row]
        if p.needs_repetition_penalty:
            seen = token_counts([[*history.prompt_ids, *history.output_ids]], logits[:1])[0] > 0
            penalty = torch.tensor(p.repetition_penalty)  # float32, as the sampler's
            x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        counts = token_counts([history.output_ids], logits[:1])[0]
        frequency, presence = torch.tensor(p.frequency_penalty), torch.tensor(p.presence_penalty)
        penalised = x - frequency * counts - presence * (counts > 0).float()
        expected[row] = torch.where(counts > 0, penalised, x)
    assert torch.equal(apply_penalties(logits, params, histories), expected)
