"""Weights from a GGUF file: Hugging Face names and layouts, dequantized or kept in the file's
blocks for our kernels.

Tensors are dequantized to float with the `gguf` package. llama.cpp stores Q and K rows permuted
for its interleaved rotary layout (pairs (2i, 2i+1) rotate together); we un-permute them on load
so the model applies rotate-half rotary (pairs (i, i + d/2)) like every Hugging Face Llama
checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import gguf
import numpy as np
import torch

from services.engine.block_linear import BlockQuantized, Weight, block_format
from services.engine.gguf_loader import gguf_name, read_config, tensor_index

log = logging.getLogger(__name__)


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute`: within each head, llama.cpp's rows are ordered
    (pair, half), i.e. interleaved; HF's are (half, pair). [num_heads * head_dim, in]"""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists dimensions fastest-first; HF's [out, in] is the reverse.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    return values if values.flags.writeable else values.copy()


def read_weights(path: Path, dtype: torch.dtype, keep_blocks: bool = False) -> dict[str, Weight]:
    """HF names to float tensors in `dtype`; with `keep_blocks`, 2-D tensors in a block format
    our kernels multiply (Q4_1, Q8_0) stay as the file's blocks (`BlockQuantized`)."""
    config = read_config(path)
    tensors = tensor_index(path)
    weights: dict[str, Weight] = {}
    unsupported: set[str] = set()
    for name, shape in config.weight_shapes().items():
        file_name = gguf_name(name)
        if file_name not in tensors:
            raise ValueError(f"{path}: missing tensor {file_name!r}")
        weight = _read_tensor(tensors[file_name], shape, keep_blocks, unsupported)
        if file_name.endswith("attn_q.weight"):
            weight = _unpermute(weight, config.num_heads)
        elif file_name.endswith("attn_k.weight"):
            weight = _unpermute(weight, config.num_kv_heads)
        if tuple(weight.shape) != shape:
            raise ValueError(f"{path}: {file_name} has shape {tuple(weight.shape)}, want {shape}")
        weights[name] = weight if isinstance(weight, BlockQuantized) else weight.to(dtype)
    unknown = set(tensors) - {gguf_name(name) for name in weights}
    if unknown:
        raise ValueError(f"{path}: unexpected tensors {sorted(unknown)[:5]}")
    if unsupported:
        log.warning(
            "%s: no CPU kernel for GGUF type(s) %s; those tensors are dequantized to %s",
            path.name,
            sorted(unsupported),
            dtype,
        )
    return weights


def _read_tensor(
    tensor: gguf.ReaderTensor, shape: tuple[int, ...], keep_blocks: bool, unsupported: set[str]
) -> Weight:
    type_name = tensor.tensor_type.name
    if keep_blocks and len(shape) == 2 and type_name not in ("F32", "F16", "BF16"):
        fmt = block_format(type_name, (shape[0], shape[1]))
        if fmt is not None:
            return BlockQuantized(fmt, torch.from_numpy(np.array(tensor.data)), shape[1])
        unsupported.add(type_name)
    return torch.from_numpy(_dequantize(tensor))


def _unpermute(weight: Weight, num_heads: int) -> Weight:
    if isinstance(weight, BlockQuantized):  # blocks run along rows: permute the file's rows
        return dataclasses.replace(weight, rows=unpermute_rotary(weight.rows, num_heads))
    return unpermute_rotary(weight, num_heads)
