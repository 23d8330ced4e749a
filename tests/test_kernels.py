"""Our CPU kernels against torch on the same numbers, and their batch invariance, on shapes
beyond the default model's (GQA groups of 1, 3 and 4, head_dim 32 to 128)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from services.engine import attention, kernels
from services.engine.attention import AttentionMetadata, Rotary
from services.engine.block_linear import BlockLinear
from services.engine.quantization import q4_1_blocks, q8_0_blocks
from tests.engine_reference import as_matmul_inputs

BLOCK = 16
pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels did not build")


def metadata(lengths: list[int], starts: list[int], max_blocks: int) -> AttentionMetadata:
    """Sequence i holds tokens [starts[i], lengths[i]) in blocks i*max_blocks.. onwards."""
    slots, seqs, positions = [], [], []
    for i, (length, start) in enumerate(zip(lengths, starts, strict=True)):
        for pos in range(start, length):
            slots.append((i * max_blocks + pos // BLOCK) * BLOCK + pos % BLOCK)
            seqs.append(i)
            positions.append(pos)
    tables = [[i * max_blocks + b for b in range(max_blocks)] for i in range(len(lengths))]
    tensor = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return AttentionMetadata(tensor(slots), tensor(tables), tensor(seqs), tensor(positions))


def run(qkv, rotary, cache, meta, heads, kv_heads, gathered: bool):
    if not gathered:
        return attention.rope_attention(qkv, rotary, cache, meta, heads, kv_heads)
    meta.attn_mask = None
    seq_lengths = torch.bincount(meta.token_seq)
    max_q = int(seq_lengths.max())
    rows, mask = [], torch.zeros(len(seq_lengths), 1, max_q, meta.block_tables.shape[1] * BLOCK)
    for i in range(len(seq_lengths)):
        positions = meta.positions[meta.token_seq == i]
        for j, pos in enumerate(positions.tolist()):
            rows.append(i * max_q + j)
            mask[i, 0, j, : pos + 1] = 1
    meta.attn_mask, meta.max_query_len = mask.bool(), max_q
    meta.query_rows = torch.tensor(rows) if max_q > 1 else None
    head_dim = qkv.shape[1] // (heads + 2 * kv_heads)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(qkv.shape[0], heads + kv_heads, -1)
    q, k = rotary.angles(meta.positions, qkv.dtype).rotate(qk).split((heads, kv_heads), dim=1)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(qkv.shape[0], kv_heads, head_dim)
    attention._store_gathered(k, v, cache, meta.slot_mapping)
    return attention._attend_gathered(q, cache, meta)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
def test_attention_matches_torch_and_does_not_depend_on_the_batch(
    heads, kv_heads, head_dim, cache_dtype
):
    """With a float16 cache, each side rounds its own rotated K: where the float32 rotations
    differ in their last bit, a value can round to the neighbouring float16 (2^-11 apart)."""
    generator = torch.Generator().manual_seed(heads)
    # 600 keys: queries past 256 keys attend in partitions merged afterwards.
    lengths, max_blocks = [37, 5, 600], 38
    rotary = Rotary(head_dim, 10000.0, 1024)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(sum(lengths), width, generator=generator)
    outs = {}
    for gathered in (False, True):
        cache = torch.zeros(2, 3 * max_blocks, kv_heads, BLOCK * head_dim, dtype=cache_dtype)
        meta = metadata(lengths, [0, 0, 0], max_blocks)
        outs[gathered] = run(qkv, rotary, cache, meta, heads, kv_heads, gathered)
    rtol, atol = (1e-4, 1e-5) if cache_dtype == torch.float32 else (1e-2, 1e-3)
    torch.testing.assert_close(outs[False], outs[True], rtol=rtol, atol=atol)
    # The last token of sequence 0 alone, its prompt already cached: bitwise the same row.
    cache = torch.zeros(2, 3 * max_blocks, kv_heads, BLOCK * head_dim, dtype=cache_dtype)
    run(qkv, rotary, cache, metadata(lengths, [0, 0, 0], max_blocks), heads, kv_heads, False)
    alone = run(qkv[36:37], rotary, cache, metadata([37], [36], max_blocks), heads, kv_heads, False)
    assert torch.equal(alone[0], outs[False][36])
    # The long sequence's last 3 tokens alone, in a batch of their own: the same rows too.
    tail = qkv[sum(lengths) - 3 :]
    meta = metadata([0, 0, 600], [0, 0, 597], max_blocks)
    assert torch.equal(run(tail, rotary, cache, meta, heads, kv_heads, False), outs[False][-3:])


@pytest.mark.parametrize("to_blocks", [q4_1_blocks, q8_0_blocks])
def test_block_matmuls_match_float64_and_do_not_depend_on_the_rows(to_blocks):
    generator = torch.Generator().manual_seed(0)
    weight = to_blocks(torch.randn(160, 1536, generator=generator))
    layer = BlockLinear(weight)
    x = torch.randn(300, 1536, generator=generator)
    x[3] *= 1e-30  # tiny and zero blocks round too
    x[4, :64] = 0
    w = weight.dequantize().double()
    got = layer(x)
    expected = as_matmul_inputs(x).double() @ w.T
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6
    # int16 inputs: within 2^-16 of each block's largest value, so close to float32 inputs.
    exact = x.double() @ w.T
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-4
    # Row 0 and the last row, computed with 1 to 300 rows (register tiles, panels, threads,
    # and where the CPU has AMX, tiles of 16 rows from 32 rows on, in chunks of 256).
    for rows in (1, 2, 3, 5, 16, 17, 31, 32, 33, 63, 64, 65, 130, 256, 257, 300):
        part = layer(x[:rows])
        assert torch.equal(part[0], got[0]) and torch.equal(part[-1], got[rows - 1])
    assert np.isfinite(got.numpy()).all()


def test_argmax_rows_is_torch_argmax():
    """First index of the largest value, or of the first NaN: torch's rule, on any width."""
    generator = torch.Generator().manual_seed(0)
    for vocab in (1, 15, 49152, 49157):
        logits = torch.randn(7, vocab, generator=generator)
        logits[1] = float("-inf")  # every token banned
        logits[2, vocab // 2 :] = float("nan")
        logits[3, :] = 2.0  # all tied
        logits[4, -1] = float("inf")
        logits[5, [0, vocab - 1]] = 50.0  # tied, far apart
        assert torch.equal(torch.ops.llmserve.argmax_rows(logits), logits.argmax(-1)), vocab


def test_parallel_for_returns_only_once_every_chunk_is_done(tmp_path):
    """Back-to-back calls, each cut into more chunks than the one before: a thread that looked
    for work as one call ended must never take a chunk of the next (it once could, counting
    that chunk twice, so the call returned while its last chunk was still being computed)."""
    torch_dir = Path(torch.__file__).parent
    program = tmp_path / "parallel_for_stress"
    compile_command = [
        os.environ.get("CXX", "c++"),
        "-O2",
        "-std=c++17",
        f"-I{torch_dir / 'include'}",
        str(Path(__file__).with_name("parallel_for_stress.cpp")),
        str(kernels.library_path()),
        f"-L{torch_dir / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        "-o",
        str(program),
    ]
    subprocess.run(compile_command, check=True, capture_output=True, timeout=300)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{torch_dir / 'lib'}"}
    calls = 100_000
    result = subprocess.run(
        [program, "2", str(calls)], env=env, check=True, capture_output=True, text=True, timeout=300
    )
    assert int(result.stdout) == 0, f"{result.stdout.strip()} of {calls} calls returned early"


def test_attention_rejects_a_head_size_it_has_no_code_for():
    """An error in the calling thread, not in a worker thread (which would end the process);
    the engine sends such heads to the gathering backend (kernels.serves_cache)."""
    heads, kv_heads, head_dim = 2, 1, 16
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head_dim)
    cos, sin = torch.ones(8, head_dim // 2), torch.zeros(8, head_dim // 2)
    cache = torch.zeros(2, 1, kv_heads, BLOCK * head_dim)
    index = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="head_dim 16 is not one of"):
        torch.ops.llmserve.rope_attention(
            qkv, cos, sin, cache, index, index[None], index, index, heads, kv_heads, 0.25
        )
    assert not kernels.serves_cache(cache, head_dim) and kernels.serves_cache(cache, 64)
