"""A request's numbers do not depend on what runs beside it (the default engine, real model).

Logits, hence greedy tokens and logprobs, are bitwise equal whether a prompt runs alone or in
a batch of 16 prompts of other lengths, prefilled in one pass or in chunks, or on top of
blocks that another request's pass computed (a prefix-cache hit).
"""

import pytest
import torch

from services.engine.runner import SeqChunk
from tests.engine_reference import default_runner

BLOCK = 16
NUM_STEPS = 8
TARGET = (
    "You are a careful geology teacher. A student asks: why is the sea salty while rivers and "
    "lakes are fresh? Explain in two sentences, mention rocks, rain and evaporation, and end "
    "with one question the student could explore next."
)


@pytest.fixture(scope="module")
def runner():
    return default_runner(16384, BLOCK)


def others(tokenizer) -> list[list[int]]:
    """15 prompts of lengths from 3 to ~300 tokens."""
    text = "The quick brown fox jumps over the lazy dog while the farmer counts sheep. "
    return [tokenizer.encode(f"Story {i}: " + text * (i * i // 3)) for i in range(15)]


def greedy(runner, prompts, prefill_chunks=None, steps=NUM_STEPS):
    """Greedy decoding of all prompts in one batch per step. `prefill_chunks` splits the
    first prompt's prefill into passes of those sizes (each a separate forward)."""
    blocks = runner.pool.blocks
    tables = [blocks.allocate(-(-(len(p) + steps) // BLOCK)) for p in prompts]
    try:
        logits = _prefill(runner, prompts, tables, prefill_chunks)
        seqs = [list(p) for p in prompts]
        rows = [logits]
        for _ in range(steps - 1):
            for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                seq.append(token)
            chunks = [SeqChunk([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
            logits = runner.forward(chunks)
            rows.append(logits)
        return torch.stack(rows, dim=1)  # [num_prompts, steps, vocab]
    finally:
        for table in tables:
            blocks.free(table)


def _prefill(runner, prompts, tables, prefill_chunks):
    if not prefill_chunks:
        return runner.forward([SeqChunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    first, table = prompts[0], tables[0]
    start = 0
    for size in prefill_chunks:  # as prefill runs them: no logits before the last chunk
        skipped = runner.forward(
            [SeqChunk(first[start : start + size], start, table, samples=False)]
        )
        assert skipped.shape[0] == 0
        start += size
    last = runner.forward([SeqChunk(first[start:], start, table)])
    if len(prompts) == 1:
        return last
    rest = runner.forward([SeqChunk(p, 0, t) for p, t in zip(prompts[1:], tables[1:], strict=True)])
    return torch.cat([last, rest])


def test_alone_equals_in_a_batch_of_16(runner, tokenizer):
    target = tokenizer.encode(TARGET)
    alone = greedy(runner, [target])[0]
    first = greedy(runner, [target, *others(tokenizer)])[0]
    last = greedy(runner, [*others(tokenizer), target])[-1]
    assert torch.equal(alone, first) and torch.equal(alone, last)


@pytest.mark.parametrize("chunks", [[5], [16, 1], [3, 7, 11]])
def test_one_pass_equals_chunked_prefill(runner, tokenizer, chunks):
    target = tokenizer.encode(TARGET)
    assert sum(chunks) < len(target)
    assert torch.equal(greedy(runner, [target])[0], greedy(runner, [target], chunks)[0])


def test_a_chunk_without_logits_leaves_the_others_rows_as_they_were(runner, tokenizer):
    """A prompt chunk that samples nothing (not its prompt's last) gets no logits row; the
    rows of the chunks beside it are the ones they get when it has one."""
    prompts = [tokenizer.encode(TARGET), *others(tokenizer)[:3]]
    blocks = runner.pool.blocks

    def rows(samples: bool) -> torch.Tensor:
        tables = [blocks.allocate(-(-len(p) // BLOCK)) for p in prompts]
        try:
            chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)]
            chunks[1].samples = samples
            return runner.forward(chunks)
        finally:
            for table in tables:
                blocks.free(table)

    with_row, without = rows(True), rows(False)
    assert without.shape[0] == len(prompts) - 1
    assert torch.equal(without, with_row[[0, 2, 3]])


def test_prefix_cache_hit_equals_computing_it(runner, tokenizer):
    """Blocks written by another request's pass, then reused: the same numbers."""
    target = tokenizer.encode(TARGET)
    cached_blocks = len(target) // BLOCK
    assert cached_blocks >= 1
    expected = greedy(runner, [target])[0]
    blocks = runner.pool.blocks
    table = blocks.allocate(-(-(len(target) + NUM_STEPS) // BLOCK))
    scratch = blocks.allocate(3)
    try:
        # Another request with the same first blocks but a different tail, batched with others.
        donor = target[: cached_blocks * BLOCK] + tokenizer.encode(" Something else entirely.")
        donor_table = table[:cached_blocks] + scratch[:2]
        runner.forward([SeqChunk(donor, 0, donor_table), SeqChunk(target[:4], 0, scratch[2:])])
        seq, rows = list(target), []
        chunk = SeqChunk(target[cached_blocks * BLOCK :], cached_blocks * BLOCK, table)
        for _ in range(NUM_STEPS):
            logits = runner.forward([chunk])
            rows.append(logits[0])
            seq.append(int(logits.argmax()))
            chunk = SeqChunk(seq[-1:], len(seq) - 1, table)
    finally:
        blocks.free(table)
        blocks.free(scratch)
    assert torch.equal(expected, torch.stack(rows))


def test_layers_in_one_kernel_call_equal_layer_by_layer(runner, tokenizer):
    """`llmserve::decoder_layers` (the default) computes what the layer-by-layer forward
    computes, bit for bit, in prefill and in decode."""
    model = runner.model
    assert model._kernel_weights is not None  # the default model runs its layers in one call
    prompts = [tokenizer.encode(TARGET), *others(tokenizer)[:4]]
    fused = greedy(runner, prompts)
    model.__dict__["_kernel_weights"] = None  # the layer-by-layer forward
    try:
        layered = greedy(runner, prompts)
    finally:
        del model.__dict__["_kernel_weights"]
    assert torch.equal(fused, layered)
