"""The model's weights for a model spec (see loader.py for the specs)."""

from __future__ import annotations

import torch

from services.engine import gguf_weights, hf_weights
from services.engine.block_linear import Weight
from services.engine.config import ModelConfig
from services.engine.loader import dummy_config, resolve, source_path

DUMMY_SEED = 0
DUMMY_STD = 0.02


def load_weights(spec: str, dtype: torch.dtype, keep_blocks: bool = False) -> dict[str, Weight]:
    """HF Llama names, [out, in] layouts, on CPU in `dtype`; lm_head only when untied. With
    `keep_blocks`, a GGUF's Q4_1/Q8_0 matrices stay in their blocks (`BlockQuantized`)."""
    source = resolve(spec)
    if source.kind == "gguf":
        return gguf_weights.read_weights(source_path(source), dtype, keep_blocks)
    weights: dict[str, Weight] = {}
    if source.kind == "hf":
        weights.update(hf_weights.read_weights(source_path(source), dtype))
    else:
        weights.update(dummy_weights(dummy_config(source.path), dtype))
    return weights


def dummy_weights(config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded N(0, 0.02) matrices and unit norms: reproducible across runs and dtypes."""
    generator = torch.Generator().manual_seed(DUMMY_SEED)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in config.weight_shapes().items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=dtype)
            continue
        # Drawn in float32 so that every dtype sees the same values, rounded.
        values = torch.empty(shape, dtype=torch.float32).normal_(
            0.0, DUMMY_STD, generator=generator
        )
        weights[name] = values.to(dtype)
    return weights
