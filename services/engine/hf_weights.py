"""Weights from a Hugging Face Llama directory's safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from services.engine.config import ModelConfig
from services.engine.hf_loader import read_config, read_json

# Buffers some exporters save that the model recomputes; never needed.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [directory / shard for shard in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors files")
    return files


def read_weights(directory: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    config = read_config(directory)
    shapes = config.weight_shapes()
    found: dict[str, torch.Tensor] = {}
    for shard in _shard_files(directory):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in shapes:
                    found[name] = f.get_tensor(name).to(dtype)
                elif not _ignorable(name, config):
                    raise ValueError(f"{shard}: unexpected tensor {name!r}")
    missing = [name for name in shapes if name not in found]
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:5]}")
    weights: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if tuple(found[name].shape) != shape:
            raise ValueError(
                f"{directory}: {name} has shape {tuple(found[name].shape)}, want {shape}"
            )
        weights[name] = found[name]
    return weights


def _ignorable(name: str, config: ModelConfig) -> bool:
    # Tied checkpoints sometimes store lm_head as a copy of the embedding.
    tied_copy = name == "lm_head.weight" and config.tie_word_embeddings
    return tied_copy or name.endswith(_IGNORED_SUFFIXES)
