"""Config and tokenizer from a Hugging Face Llama directory (weights: hf_weights.py).

Expected files: config.json, *.safetensors (optionally sharded via model.safetensors.index.json),
tokenizer.json and tokenizer_config.json (whose chat_template, or a chat_template.jinja file,
holds the chat template); generation_config.json is read for extra eos ids when present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from services.engine.config import ModelConfig
from services.engine.tokenizer import Tokenizer, end_token_ids

_LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"missing {path}")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _check_llama(data: dict[str, Any], source: str) -> None:
    archs = set(data.get("architectures") or [])
    if data.get("model_type") != "llama" and not archs & _LLAMA_ARCHITECTURES:
        found = data.get("model_type") or sorted(archs)
        raise ValueError(f"{source}: unsupported architecture {found!r} (supported: llama)")
    if data.get("attention_bias") or data.get("mlp_bias"):
        raise ValueError(f"{source}: llama variants with biases are not supported")
    if data.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: activation {data['hidden_act']!r} is not supported")
    scaling = data.get("rope_scaling") or data.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"{source}: rope scaling {kind!r} is not supported")


def config_from_hf_dict(
    data: dict[str, Any], model_id: str, special_ids: dict[str, int] | None = None
) -> ModelConfig:
    """ModelConfig from a config.json body. special_ids (the tokenizer's special tokens) lets
    chat end-of-turn markers join the declared eos ids."""
    _check_llama(data, model_id)
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{model_id}: config.json lacks {missing}")
    hidden, num_heads = int(data["hidden_size"]), int(data["num_attention_heads"])
    rope = data.get("rope_parameters") or {}
    theta = data.get("rope_theta", rope.get("rope_theta", 10000.0))
    declared = _id_list(data.get("eos_token_id"))
    return ModelConfig(
        model_id=model_id,
        architecture="llama",
        vocab_size=int(data["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(data["intermediate_size"]),
        num_layers=int(data["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(data.get("num_key_value_heads") or num_heads),
        head_dim=int(data.get("head_dim") or hidden // num_heads),
        rope_theta=float(theta),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
        # transformers' LlamaConfig defaults to untied.
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        bos_token_id=None if data.get("bos_token_id") is None else int(data["bos_token_id"]),
        eos_token_ids=end_token_ids(declared, (special_ids or {}).get),
    )


def special_token_ids(directory: Path) -> dict[str, int]:
    path = directory / "tokenizer.json"
    if not path.is_file():
        return {}
    added = read_json(path).get("added_tokens", [])
    return {tok["content"]: int(tok["id"]) for tok in added if tok.get("special")}


def read_config(directory: Path) -> ModelConfig:
    data = read_json(directory / "config.json")
    generation = directory / "generation_config.json"
    if generation.is_file():
        # Generation stops on these too; HF's generate() takes them from here.
        extra = _id_list(read_json(generation).get("eos_token_id"))
        declared = _id_list(data.get("eos_token_id"))
        data = {**data, "eos_token_id": list(dict.fromkeys(declared + extra))}
    return config_from_hf_dict(data, directory.name, special_token_ids(directory))


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores special tokens as strings or as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        # Named templates: the one called "default" is what apply_chat_template uses.
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


def read_tokenizer(directory: Path, config: ModelConfig | None = None) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"missing {path}")
    backend = BackendTokenizer.from_file(str(path))
    tokenizer_config_path = directory / "tokenizer_config.json"
    tokenizer_config = read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    if config is None:
        config = read_config(directory)
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    template_tokens = {
        name: text for name in names if (text := _token_text(tokenizer_config.get(name)))
    }
    return Tokenizer(
        backend,
        bos_token_id=config.bos_token_id,
        eos_token_ids=config.eos_token_ids,
        chat_template=_chat_template(directory, tokenizer_config),
        template_tokens=template_tokens or None,
    )
