"""Weights kept in their GGUF block format, and the linear layer that multiplies by them.

A GGUF Q4_1 or Q8_0 matrix stays as the file's blocks (regrouped into tiles, never
requantized) and is multiplied by our CPU kernels with float32 activations and accumulation
(services/engine/kernels). Row operations the loader needs (un-permuting Q/K rows, fusing
q/k/v and gate/up) work on the file's rows before packing, since GGUF blocks run along rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import nn

from services.engine import kernels
from services.engine.kernels.packing import FORMATS, BlockFormat, can_pack
from services.engine.kernels.tile_files import mapped_rows, mapped_tiles


@dataclass(slots=True)
class BlockQuantized:
    """A weight as the file stores it: rows [out_features, in_features / 32 * block_bytes]."""

    fmt: BlockFormat
    rows: torch.Tensor  # uint8
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.shape[0], self.in_features)

    def dequantize(self) -> torch.Tensor:
        kind = gguf.GGMLQuantizationType[self.fmt.name]
        values = gguf.quants.dequantize(self.rows.numpy(), kind)
        return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(self.shape).copy())


def block_format(type_name: str, shape: tuple[int, int]) -> BlockFormat | None:
    """The kernel format for a GGUF tensor type and [out, in] shape, if there is one."""
    fmt = FORMATS.get(type_name)
    return fmt if fmt is not None and can_pack(fmt, *shape) else None


Weight = torch.Tensor | BlockQuantized


def concat_rows(weights: list[Weight]) -> Weight:
    """Stacks weights along their output rows; mixed formats meet as float32."""
    if all(isinstance(w, BlockQuantized) for w in weights):
        fmts = {w.fmt for w in weights if isinstance(w, BlockQuantized)}
        if len(fmts) == 1:
            first = weights[0]
            assert isinstance(first, BlockQuantized)
            rows = torch.cat([w.rows for w in weights if isinstance(w, BlockQuantized)])
            return BlockQuantized(first.fmt, rows, first.in_features)
    return torch.cat([as_float(w) for w in weights])


def as_float(weight: Weight) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, BlockQuantized) else weight


class BlockEmbedding(nn.Module):
    """A lookup table kept in GGUF blocks: the rows looked up are dequantized, to the same
    float32 values as the whole table dequantized, in a fraction of its memory."""

    def __init__(self, weight: BlockQuantized) -> None:
        super().__init__()
        self._kind = gguf.GGMLQuantizationType[weight.fmt.name]
        self.embedding_dim = weight.in_features
        self.register_buffer("rows", mapped_rows(weight.rows.numpy()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows[input_ids.cpu()].numpy()
        values = np.asarray(gguf.quants.dequantize(rows, self._kind), dtype=np.float32)
        return torch.from_numpy(values.reshape(len(rows), self.embedding_dim))

    def extra_repr(self) -> str:
        return f"{self.rows.shape[0]}, {self.embedding_dim}, format={self._kind.name}"


class BlockLinear(nn.Module):
    """y = x @ W.T with W in GGUF blocks; x float32 on the CPU."""

    def __init__(self, weight: BlockQuantized) -> None:
        super().__init__()
        kernels.load()
        self.fmt = weight.fmt
        self.in_features = weight.in_features
        self.out_features = weight.shape[0]
        pairs = kernels.matmul_inputs() == "int16"
        # Mapped from a file that the host's other processes of this model map too.
        self.register_buffer("tiles", mapped_tiles(weight.fmt, weight.rows.numpy(), pairs))
        self._op = getattr(torch.ops.llmserve, f"{weight.fmt.name.lower()}_linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.tiles, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.fmt.name}"
