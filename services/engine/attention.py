"""Attention over the paged KV cache, and where each token's K and V are kept.

Per layer the cache is [2, num_blocks, num_kv_heads, block_size * head_dim]: per block and
KV head, K transposed ([head_dim, block_size]) and V as rows ([block_size, head_dim]).
On the CPU in float32 our kernels (services/engine/kernels/paged_attention.cpp) write and
read it in place, one query token at a time, in an order fixed by the token's position, so
a token's output does not depend on the batch, the chunking or the prefix cache. Elsewhere
(CUDA, other dtypes) torch gathers each sequence's blocks and runs SDPA with a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import kernels


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] blocks of each sequence, in order
    token_seq: torch.Tensor  # [num_tokens] sequence (row of block_tables) of each token
    positions: torch.Tensor  # [num_tokens] each token's position; it attends keys [0, pos]
    # Gathering backend only: [num_seqs, 1, max_query_len, max_blocks * block_size] bool mask,
    # each token's row in the padded [num_seqs * max_query_len] query layout (None when every
    # sequence has one query token), and that max_query_len.
    attn_mask: torch.Tensor | None = None
    query_rows: torch.Tensor | None = None
    max_query_len: int = 1
    angles: RotaryAngles | None = None  # the tokens' rotary rows, looked up once per pass


def in_place(cache: torch.Tensor, head_dim: int) -> bool:
    """Whether our kernels serve this cache (else the gathering backend, which needs masks)."""
    return kernels.serves_cache(cache, head_dim)


def cache_shape(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (num_layers, 2, num_blocks, num_kv_heads, block_size * head_dim)


def tokens_kv(cache: torch.Tensor, block_table: list[int], head_dim: int) -> torch.Tensor:
    """A sequence's K and V in token order: [num_layers, 2, tokens, num_kv_heads, head_dim]
    for the blocks of `block_table` (whole blocks)."""
    layers, _, _, kvh, block_elems = cache.shape
    block_size = block_elems // head_dim
    blocks = cache[:, :, block_table]  # [layers, 2, n, kvh, block_elems]
    n = len(block_table)
    k = blocks[:, 0].view(layers, n, kvh, head_dim, block_size).permute(0, 1, 4, 2, 3)
    v = blocks[:, 1].view(layers, n, kvh, block_size, head_dim).permute(0, 1, 3, 2, 4)
    return torch.stack((k, v), dim=1).reshape(layers, 2, n * block_size, kvh, head_dim)


@dataclass(slots=True)
class RotaryAngles:
    cos: torch.Tensor
    sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, num_heads, head_dim]."""
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = self.cos, self.sin
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Rotary(nn.Module):
    """Rotate-half rotary embedding with a precomputed cos/sin table [positions, head_dim / 2].
    The gathering backend looks up a pass's rows once (`angles`) for every layer."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # [num_tokens, 1, head_dim / 2]
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return RotaryAngles(cos, sin)


def rope_attention(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    rotary: Rotary,
    kv_cache: torch.Tensor,  # [2, num_blocks, num_kv_heads, block_size * head_dim]
    meta: AttentionMetadata,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotates Q and K, writes the tokens' K and V into their slots, then attends;
    returns [num_tokens, num_heads * head_dim]."""
    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    if in_place(kv_cache, head_dim):
        return torch.ops.llmserve.rope_attention(
            qkv, rotary.cos, rotary.sin, kv_cache, meta.slot_mapping, meta.block_tables,
            meta.token_seq, meta.positions, num_heads, num_kv_heads, head_dim**-0.5,
        )  # fmt: skip
    if meta.angles is None:
        meta.angles = rotary.angles(meta.positions, qkv.dtype)
    # Q's and K's heads side by side, rotated in one pass.
    qk_size = (num_heads + num_kv_heads) * head_dim
    qk = meta.angles.rotate(qkv[:, :qk_size].view(num_tokens, num_heads + num_kv_heads, -1))
    q, k = qk.split((num_heads, num_kv_heads), dim=1)
    v = qkv[:, qk_size:].view(num_tokens, num_kv_heads, head_dim)
    _store_gathered(k, v, kv_cache, meta.slot_mapping)
    return _attend_gathered(q, kv_cache, meta)


def _store_gathered(k, v, kv_cache, slot_mapping) -> None:
    _, num_blocks, kvh, block_elems = kv_cache.shape
    head_dim = k.shape[-1]
    block_size = block_elems // head_dim
    block, offset = slot_mapping // block_size, slot_mapping % block_size
    k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    kv_cache[0].view(num_blocks, kvh, head_dim, block_size)[block, :, :, offset] = k
    kv_cache[1].view(num_blocks, kvh, block_size, head_dim)[block, :, offset] = v


def _attend_gathered(q, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
    assert meta.attn_mask is not None
    num_seqs, max_blocks = meta.block_tables.shape
    max_q = meta.max_query_len
    _, _, kvh, block_elems = kv_cache.shape
    num_heads, hd = q.shape[1], q.shape[2]
    group, block_size = num_heads // kvh, block_elems // hd
    if meta.query_rows is None:
        q_pad = q.contiguous()
    else:
        q_pad = q.new_zeros(num_seqs * max_q, num_heads, hd)
        q_pad[meta.query_rows] = q
    # Queries of one KV head's group are stacked so K/V are never repeated per head.
    q_grouped = (
        q_pad.view(num_seqs, max_q, kvh, group, hd)
        .permute(0, 2, 3, 1, 4)
        .reshape(num_seqs, kvh, group * max_q, hd)
    )
    blocks = kv_cache.index_select(1, meta.block_tables.flatten())
    # -> [num_seqs, kvh, context, hd]
    keys = blocks[0].view(num_seqs, max_blocks, kvh, hd, block_size).permute(0, 2, 1, 4, 3)
    keys = keys.reshape(num_seqs, kvh, max_blocks * block_size, hd)
    values = blocks[1].view(num_seqs, max_blocks, kvh, block_size, hd).transpose(1, 2)
    values = values.reshape(num_seqs, kvh, max_blocks * block_size, hd)
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # a cache may store fewer bits
    mask = meta.attn_mask
    if group > 1:
        mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).flatten(2, 3)
    out = F.scaled_dot_product_attention(q_grouped, keys, values, attn_mask=mask)
    # [num_seqs, kvh, group * max_q, hd] -> [num_seqs * max_q, num_heads * hd]
    out = out.view(num_seqs, kvh, group, max_q, hd).permute(0, 3, 1, 2, 4)
    out = out.reshape(num_seqs * max_q, num_heads * hd)
    return out if meta.query_rows is None else out[meta.query_rows]
