"""GGUF quantized rows regrouped into the tiles the CPU kernels read (quant_linear.cpp).

A tile covers 16 output features and one 32-input GGUF block: the 16 float16 scales, for
Q4_1 the 16 float16 minimums, then the quantized values input-major (for Q4_1 byte j of row
p holds output j's inputs p (low nibble) and p + 16 (high nibble), exactly the file's byte).
For the int16 kernels (vnni_linear.cpp) values come in the (p, p + 16) input pairs that
vpdpwssd multiplies: Q8_0 row p holds, for each output j, its inputs p and p + 16 side by
side (one sign extension gives the pairs); Q4_1 row i (0..7) holds, per output j, the bytes
q[i] | q[i + 8] << 4 and q[i + 16] | q[i + 24] << 4 (widened to 16 bits, a mask gives the
pairs for p = i and a shift those for p = i + 8). Values are moved, never requantized: the
weights are the file's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TILE_OUTPUTS = 16
BLOCK_INPUTS = 32


@dataclass(frozen=True, slots=True)
class BlockFormat:
    name: str  # the GGUF type name
    block_bytes: int  # one block of 32 weights in the file
    num_scales: int  # float16 values at the start of a block (d, or d and m)

    @property
    def tile_bytes(self) -> int:
        return TILE_OUTPUTS * self.block_bytes


Q4_1 = BlockFormat("Q4_1", 20, 2)
Q8_0 = BlockFormat("Q8_0", 34, 1)
FORMATS = {f.name: f for f in (Q4_1, Q8_0)}


def can_pack(fmt: BlockFormat, out_features: int, in_features: int) -> bool:
    return out_features % TILE_OUTPUTS == 0 and in_features % BLOCK_INPUTS == 0


def pack(fmt: BlockFormat, rows: np.ndarray, pairs: bool = False) -> torch.Tensor:
    """rows: the file's bytes, [out_features, in_features / 32 * block_bytes] uint8; pairs:
    values in input pairs (p, p + 16). Returns tiles [out_features / 16, in_features / 32,
    tile_bytes] uint8."""
    out_features = rows.shape[0]
    num_blocks = rows.shape[1] // fmt.block_bytes
    # [groups, blocks, 16 outputs, block_bytes]
    blocks = rows.reshape(out_features // TILE_OUTPUTS, TILE_OUTPUTS, num_blocks, fmt.block_bytes)
    blocks = blocks.transpose(0, 2, 1, 3)
    parts = []
    for i in range(fmt.num_scales):  # each scale for the 16 outputs, side by side
        parts.append(blocks[..., 2 * i : 2 * i + 2].reshape(*blocks.shape[:2], -1))
    values = blocks[..., 2 * fmt.num_scales :]  # [groups, blocks, 16 outputs, bytes]
    if pairs and fmt == Q8_0:  # [.., output, half, p] -> [.., p, output, half]
        values = values.reshape(*values.shape[:3], 2, 16).transpose(0, 1, 4, 2, 3)
    elif pairs:  # Q4_1: q by input, [.., output, quarter, i] (input = 8 * quarter + i)
        q = np.concatenate([values & 15, values >> 4], axis=-1).reshape(*values.shape[:3], 4, 8)
        low, high = q[..., 0, :] | q[..., 1, :] << 4, q[..., 2, :] | q[..., 3, :] << 4
        values = np.stack([low, high], axis=-1).transpose(0, 1, 3, 2, 4)  # [.., i, output, 2]
    else:
        values = values.transpose(0, 1, 3, 2)
    parts.append(values.reshape(*blocks.shape[:2], -1))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=-1)))
