"""Loaders: the default GGUF against transformers' own GGUF loading, a Hugging Face directory
round trip, dummy weights, and refusals."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.engine import gguf_loader, gguf_weights
from services.engine.config import DEFAULT_MODEL, ModelConfig
from services.engine.loader import default_gguf_path, load_config, load_tokenizer
from services.engine.weights import load_weights


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return load_config(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_weights(DEFAULT_MODEL, torch.float32)


def test_default_config(config: ModelConfig) -> None:
    assert config.model_id == "SmolLM2-135M-Instruct"
    assert config.architecture == "llama"
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 8192
    assert config.bos_token_id == 1 and config.eos_token_ids == [2, 0]


def test_weight_names_and_shapes(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    assert list(weights) == list(config.weight_shapes())
    assert "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights.values())


def _convert_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's `permute`: HF rotate-half rows -> llama.cpp interleaved rows."""
    rows = weight.shape[0]
    split = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def test_unpermute_inverts_convert_permute() -> None:
    weight = torch.randn(3 * 8, 5)
    permuted = _convert_permute(weight, 3)
    assert not torch.equal(permuted, weight)
    assert torch.equal(gguf_weights.unpermute_rotary(permuted, 3), weight)


def _rope_half(x: torch.Tensor, theta: float) -> torch.Tensor:
    # [T, heads, d]: HF rotate-half pairs dims (i, i + d/2) with frequency i.
    positions, dim = torch.arange(x.shape[0], dtype=torch.float64), x.shape[-1]
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(positions, freqs)[:, None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rope_interleaved(x: torch.Tensor, theta: float) -> torch.Tensor:
    # [T, heads, d]: llama.cpp's layout pairs dims (2i, 2i + 1) with frequency i.
    positions, dim = torch.arange(x.shape[0], dtype=torch.float64), x.shape[-1]
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(positions, freqs)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _raw_gguf(name: str) -> torch.Tensor:
    tensor = next(t for t in gguf_loader.open_reader(default_gguf_path()).tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float64)).reshape(-1, tensor.shape[0])


def _scores(q: torch.Tensor, k: torch.Tensor, group: int) -> torch.Tensor:
    return torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, dim=1))


def test_unpermuted_qk_with_hf_rotary_equal_gguf_with_llama_cpp_rotary(
    config: ModelConfig, weights: dict[str, torch.Tensor]
) -> None:
    x = torch.randn(
        7, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    group, theta = heads // kv_heads, config.rope_theta
    prefix = "model.layers.3.self_attn."
    q = (x @ weights[prefix + "q_proj.weight"].double().T).reshape(7, heads, dim)
    k = (x @ weights[prefix + "k_proj.weight"].double().T).reshape(7, kv_heads, dim)
    ours = _scores(_rope_half(q, theta), _rope_half(k, theta), group)
    q_raw = (x @ _raw_gguf("blk.3.attn_q.weight").T).reshape(7, heads, dim)
    k_raw = (x @ _raw_gguf("blk.3.attn_k.weight").T).reshape(7, kv_heads, dim)
    llama_cpp = _scores(_rope_interleaved(q_raw, theta), _rope_interleaved(k_raw, theta), group)
    torch.testing.assert_close(ours, llama_cpp, rtol=1e-9, atol=1e-9)


def test_weights_match_transformers_gguf_loading(weights: dict[str, torch.Tensor]) -> None:
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    with pytest.MonkeyPatch.context() as patch:
        # Speed only, not what is compared: share our parsed reader (parsing takes seconds), and
        # memoize the pure name-map builder transformers calls once per module.
        patch.setattr(gguf, "GGUFReader", gguf_loader.open_reader)
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    reference = model.state_dict()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for layer in (0, 17, 29):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"model.layers.{layer}.self_attn.{proj}.weight")
        names += [f"model.layers.{layer}.mlp.down_proj.weight"]
        names += [f"model.layers.{layer}.input_layernorm.weight"]
    for name in names:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-6, msg=name)


def _write_hf_directory(directory: Path, config: ModelConfig, weights: dict) -> None:
    names = list(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: weights[n].contiguous() for n in shard_names}, str(directory / shard))
        weight_map.update({n: shard for n in shard_names})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))


def test_hf_directory_round_trip(
    tmp_path: Path, config: ModelConfig, weights: dict[str, torch.Tensor]
) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    directory = tmp_path / "SmolLM2-copy"
    directory.mkdir()
    # The first two layers make a complete, smaller model: the same code path at a tenth of the
    # disk traffic. Stored as bf16 and read back as float32, which is exact.
    config = dataclasses.replace(config, num_layers=2)
    stored = {name: weights[name].to(torch.bfloat16) for name in config.weight_shapes()}
    _write_hf_directory(directory, config, stored)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "chat_template": tokenizer.chat_template,
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    loaded_config = load_config(str(directory))
    assert loaded_config.model_id == "SmolLM2-copy"
    assert dataclasses.replace(loaded_config, model_id=config.model_id) == config
    loaded = load_weights(str(directory), torch.float32)
    assert list(loaded) == list(stored)
    for name, tensor in stored.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.float()), name

    loaded_tokenizer = load_tokenizer(str(directory))
    text = "<|im_start|>user\nCafé 😀 costs $12.50<|im_end|>"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.eos_token_ids == [2, 0]
    messages = [{"role": "user", "content": "hi"}]
    assert loaded_tokenizer.render_chat(messages) == tokenizer.render_chat(messages)
    # A chat_template.jinja file takes precedence over tokenizer_config's key.
    (directory / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert load_tokenizer(str(directory)).render_chat(messages) == "<|im_start|>hi"


def test_dummy_default_shapes(config: ModelConfig) -> None:
    dummy_config = load_config("dummy")
    assert dummy_config.weight_shapes() == config.weight_shapes()
    assert dummy_config.eos_token_ids == config.eos_token_ids
    dummy = load_weights("dummy", torch.bfloat16)
    assert {n: tuple(w.shape) for n, w in dummy.items()} == config.weight_shapes()
    assert all(w.dtype == torch.bfloat16 for w in dummy.values())
    assert torch.equal(dummy["model.norm.weight"], torch.ones(576, dtype=torch.bfloat16))
    std = dummy["model.layers.0.mlp.up_proj.weight"].float().std().item()
    assert abs(std - 0.02) < 1e-3


def test_dummy_from_config_file(tmp_path: Path) -> None:
    tiny = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 50000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": 7,
    }
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    spec = f"dummy:{tmp_path / 'config.json'}"
    config = load_config(spec)
    assert (config.head_dim, config.tie_word_embeddings) == (16, False)
    # No tokenizer beside the config: the default one, with its special ids.
    assert config.eos_token_ids == [2, 0]
    assert load_tokenizer(spec).vocab_size == 49152
    first, second = load_weights(spec, torch.float32), load_weights(spec, torch.float32)
    assert first["lm_head.weight"].shape == (50000, 64)
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize(
    "body",
    [
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
        {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"model_type": "llama", "hidden_size": 64},
    ],
)
def test_unsupported_configs_are_refused(tmp_path: Path, body: dict) -> None:
    (tmp_path / "config.json").write_text(json.dumps(body))
    with pytest.raises(ValueError):
        load_config(str(tmp_path))


def test_unknown_specs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    for spec in ["no-such-model", str(tmp_path), str(tmp_path / "notes.txt"), "dummy:/nope"]:
        with pytest.raises(ValueError):
            load_config(spec)
    (tmp_path / "config.json").write_text(json.dumps(load_config(DEFAULT_MODEL).to_hf_dict()))
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(str(tmp_path), torch.float32)
