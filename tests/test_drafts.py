"""Speculative decoding without a model: drafters, the scheduler's draft steps, and the
acceptance rule's distribution on known distributions."""

import math

import torch

from services.decode.drafts import (
    NgramIndex,
    PredictionDrafter,
    PromptLookupDrafter,
    num_accepted,
)
from services.decode.scheduler import Scheduler
from services.engine.block_manager import BlockManager
from services.engine.sampler import Sampler
from services.request_params import SamplingParams
from tests.test_scheduler import make_seq, pulled

PROMPT = [900, 901, 902]


def test_ngram_index_finds_the_longest_matching_tail():
    index = NgramIndex([1, 2, 3, 4, 9, 2, 3, 5])
    # "2 3" occurs twice; "1 2 3" once: the longest match wins.
    assert index.continuations([1, 2, 3], limit=8) == ([3], 3)
    assert index.continuations([7, 2, 3], limit=8) == ([3, 7], 2)
    assert index.continuations([7, 2, 3], limit=7) == ([3], 2)  # ending before limit
    assert index.continuations([4, 8], limit=8) == ([], 0)  # one token is not enough


def test_prediction_drafts_follow_the_output_and_realign_after_an_edit():
    prediction = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    drafter = PredictionDrafter(prediction, len(PROMPT), max_draft=4)
    output = [10]  # prefill's first token
    assert drafter.propose(PROMPT + output, limit=8) == [11, 12, 13, 14]
    drafter.record(4, 4)
    output += [11, 12, 13, 14, 15]
    assert drafter.propose(PROMPT + output, limit=8) == [16, 17, 18, 19]
    # The edit: 99 98 replace 16, then the output goes on as predicted from 17.
    drafter.record(4, 0)
    output += [99, 98, 17, 18]
    drafter.propose(PROMPT + output, limit=8)  # the miss costs one step without drafts
    assert drafter.propose(PROMPT + output, limit=8) == [19]
    assert drafter.propose(PROMPT + output, limit=0) == []


def test_prediction_drafts_prefer_the_nearest_place_ahead():
    prediction = [1, 2, 5, 3, 1, 2, 6, 7]
    drafter = PredictionDrafter(prediction, 0, max_draft=2)
    assert drafter.propose([1, 2], limit=8) == [5, 3]
    drafter.record(2, 0)
    drafter.propose([1, 2, 8], limit=8)  # backoff
    # "1 2" again: the occurrence ahead of where the output was (index 4), not the first.
    assert drafter.propose([1, 2, 8, 1, 2], limit=8) == [6]


def test_draft_length_adapts_and_misses_back_off():
    drafter = PredictionDrafter(list(range(100, 200)), 0, max_draft=16)
    tokens = [100]
    lengths = []
    for _ in range(4):
        draft = drafter.propose(tokens, limit=64)
        lengths.append(len(draft))
        drafter.record(len(draft), len(draft))
        tokens += [*draft, tokens[-1] + len(draft) + 1]
    assert lengths == [4, 8, 16, 16]
    drafter.record(16, 3)
    assert drafter.draft_len == 3
    # Consecutive misses skip 1, 2, 4 steps before drafting again.
    skipped = []
    for _ in range(3):
        drafter.record(1, 0)
        count = 0
        while not drafter.propose(tokens, limit=64):
            count += 1
        skipped.append(count)
    assert skipped == [1, 2, 4]
    assert drafter.drafted_at[:2] == [8, 5] and drafter.accepted_at[:2] == [5, 5]


def test_prompt_lookup_drafts_what_followed_the_latest_occurrence():
    drafter = PromptLookupDrafter(max_draft=3)
    tokens = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6]
    # "5 6" occurs at 0 and 6; the latest earlier one continues 7 2 3.
    assert drafter.propose(tokens, limit=8) == [7, 2, 3]
    # A run of 4s: the 3-gram "4 4 4" also ends one token earlier, followed by one more 4.
    assert drafter.propose([*tokens, 4, 4, 4, 4], limit=8) == [4]
    assert PromptLookupDrafter(3).propose([1, 2, 3, 4], limit=8) == []


def test_scheduler_verifies_drafts_within_limits_and_returns_their_blocks():
    blocks = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=4, max_step_tokens=64)
    seq = pulled(blocks, make_seq("a", 4, max_tokens=6))  # prompt 10..13, first token 5
    seq.drafter = PredictionDrafter([5, 20, 21, 22, 23, 24, 25], 4, max_draft=16)
    scheduler.add(seq)
    step = scheduler.schedule()
    # max_tokens 6 with one generated: at most 5 new tokens, so 4 drafts.
    assert [(s.num_tokens, s.draft) for s in step] == [(1, [20, 21, 22, 23])]
    assert len(seq.block_table) == 3  # positions up to 8 reserved
    outputs = scheduler.postprocess(step, [[20, 21, 7]])  # two drafts kept, then 7
    assert [(token, finish) for _, token, finish in outputs] == [(20, None), (21, None), (7, None)]
    assert seq.token_ids[4:] == [5, 20, 21, 7] and seq.num_cached == 7
    assert len(seq.block_table) == 2  # the block only a rejected draft used went back
    assert blocks.num_free_blocks == 6


def test_a_finish_inside_the_accepted_drafts_ends_the_sequence_there():
    blocks = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=4, max_step_tokens=64)
    seq = pulled(blocks, make_seq("a", 4))
    seq.drafter = PredictionDrafter([5, 20, 2, 22], 4, max_draft=16)
    scheduler.add(seq)
    step = scheduler.schedule()
    outputs = scheduler.postprocess(step, [[20, 2, 22, 9]])  # 2 is EOS
    assert [token for _, token, _ in outputs] == [20, 2]
    assert outputs[-1][2] is not None and not scheduler.running
    assert blocks.num_free_blocks == 8


def test_drafts_never_take_blocks_that_are_not_free():
    blocks = BlockManager(num_blocks=2, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=4, max_step_tokens=64)
    seq = pulled(blocks, make_seq("a", 3))  # 3 prompt tokens + first: one block
    seq.drafter = PredictionDrafter([5, *range(20, 40)], 3, max_draft=16)
    scheduler.add(seq)
    # Position 4 needs the second block; nothing is left for drafts past position 7.
    assert scheduler.schedule()[0].draft == [20, 21, 22, 23]
    assert blocks.num_free_blocks == 0


def test_acceptance_keeps_the_distribution_of_sampling_without_drafts():
    """Two positions over a 4-token vocabulary with known distributions p (first) and q
    (second, after the draft's first token d): the first token is distributed as p, the draft
    is accepted with probability p(d), and after it the second token is distributed as q."""
    p = torch.tensor([0.1, 0.5, 0.3, 0.1])
    q = torch.tensor([0.6, 0.1, 0.1, 0.2])
    draft = [2, 0]
    trials = 20_000
    logits = torch.stack([p.log(), q.log(), q.log()]).repeat(trials, 1)
    sampler = Sampler(torch.device("cpu"), seed=7)
    params = [SamplingParams(temperature=1.0)] * len(logits)
    sampled = sampler.sample(logits, params, list(range(len(logits))))
    first, second, accepted_first = [0] * 4, [0] * 4, 0
    for t in range(trials):
        rows = sampled[3 * t : 3 * t + 3]
        kept = num_accepted(rows, draft)
        first[rows[0]] += 1
        if kept >= 1:
            accepted_first += 1
            second[rows[1]] += 1
    tolerance = 4 / math.sqrt(trials)  # about 4 standard deviations
    assert all(abs(first[i] / trials - p[i].item()) < tolerance for i in range(4))
    assert abs(accepted_first / trials - p[2].item()) < tolerance
    n = sum(second)
    assert all(abs(second[i] / n - q[i].item()) < 4 / math.sqrt(n) for i in range(4))


def test_num_accepted():
    assert num_accepted([5], []) == 0
    assert num_accepted([1, 2, 3], [1, 2]) == 2
    assert num_accepted([1, 9, 3], [1, 2]) == 1
    assert num_accepted([9, 2, 3], [1, 2]) == 0
