"""Config and tokenizer from a llama.cpp GGUF file, and the Hugging Face names of its tensors
(the weights themselves: gguf_weights.py, which needs torch; this module does not)."""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFReader
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from services.engine.config import ModelConfig
from services.engine.tokenizer import Tokenizer, bytes_to_unicode, end_token_ids

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_HF_LAYER_NAMES = {hf: key for key, hf in _LAYER_NAMES.items()}
_HF_GLOBAL_NAMES = {hf: key for key, hf in _GLOBAL_NAMES.items()}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose split we reproduce.
_GPT2_PRE = frozenset({"default", "gpt-2"})
_DIGITS_PRE = frozenset({"smollm", "starcoder", "refact"})
log = logging.getLogger(__name__)
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|[BF]F?16|F32)$", re.IGNORECASE)


def open_reader(path: Path | str) -> GGUFReader:
    """One parsed reader per file: parsing the metadata takes seconds, and config, weights and
    tokenizer loads all need it."""
    return _cached_reader(str(Path(path).resolve()))


@lru_cache(maxsize=4)
def _cached_reader(path: str) -> GGUFReader:
    return GGUFReader(path)


def forget_readers() -> None:
    """Drops the parsed readers once a process has loaded what it needs: one holds a Python
    object per metadata item (the vocabulary's included), over 200 MiB for the default model."""
    _cached_reader.cache_clear()


def _float32(value: Any) -> float:
    # Metadata floats are float32; their shortest repr recovers the decimal the converter wrote
    # (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _require(reader: GGUFReader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return value


def model_id_for(path: Path) -> str:
    """The file name without its quantization suffix: "SmolLM2-135M-Instruct.Q4_1.gguf" names
    the model better than general.name, which converters often fill with training-run names."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def read_config(path: Path) -> ModelConfig:
    reader = open_reader(path)
    arch = _require(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_index(path):
        raise ValueError(f"{path}: rope scaling ({scaling}) is not supported")
    hidden = int(_require(reader, "llama.embedding_length"))
    num_heads = int(_require(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // num_heads))
    if int(_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings are not supported")
    tokens = _require(reader, "tokenizer.ggml.tokens")
    control = _control_ids(reader)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_id=model_id_for(path),
        architecture=arch,
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_require(reader, "llama.feed_forward_length")),
        num_layers=int(_require(reader, "llama.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=_float32(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=_float32(_require(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_require(reader, "llama.context_length")),
        tie_word_embeddings="output.weight" not in tensor_index(path),
        bos_token_id=_optional_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_ids=end_token_ids([] if eos is None else [int(eos)], control.get),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _vocab(reader: GGUFReader) -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types (1 normal, 3 control, 4 user-defined)."""
    tokens: list[str] = _require(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    return tokens, types


def _control_ids(reader: GGUFReader) -> dict[str, int]:
    tokens, types = _vocab(reader)
    return {
        tok: i
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == _TOKEN_CONTROL
    }


def tensor_index(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in open_reader(path).tensors}


def gguf_name(name: str) -> str:
    module, param = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, sub = module.split(".", 3)
        return f"blk.{layer}.{_HF_LAYER_NAMES[sub]}.{param}"
    return f"{_HF_GLOBAL_NAMES[module]}.{param}"


def read_tokenizer(path: Path) -> Tokenizer:
    reader = open_reader(path)
    kind = _require(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: unsupported GGUF tokenizer {kind!r} (supported: gpt2 BPE)")
    backend = _byte_level_bpe(reader)
    config = read_config(path)
    return Tokenizer(
        backend,
        bos_token_id=config.bos_token_id,
        eos_token_ids=config.eos_token_ids,
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def _byte_level_bpe(reader: GGUFReader) -> BackendTokenizer:
    tokens, types = _vocab(reader)
    alphabet = set(bytes_to_unicode().values())
    spelling = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        plain = kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED) or set(token) <= alphabet
        # Some converters store ordinary tokens as raw text; BPE needs them in the byte alphabet.
        vocab[token if plain else "".join(spelling[b] for b in token.encode())] = token_id
    merges = [tuple(merge.split(" ", 1)) for merge in _require(reader, "tokenizer.ggml.merges")]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    # Added tokens match whole in raw text; only control tokens are special (skippable).
    backend.add_special_tokens(_added(tokens, types, _TOKEN_CONTROL, special=True))
    backend.add_tokens(_added(tokens, types, _TOKEN_USER_DEFINED, special=False))
    _add_bos_eos(backend, reader, tokens)
    return backend


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """The text splitting the merges were learned with, by llama.cpp's pre-tokenizer name.
    Refuse names we have not matched against their reference tokenizer: a wrong split still
    tokenizes, just into ids the model never saw."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in _GPT2_PRE:
        return gpt2
    if name in _DIGITS_PRE:
        # Every digit alone, then GPT-2's regex on the rest; the models' own tokenizer.json says
        # the same with Digits(individual_digits) + ByteLevel(use_regex).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    supported = sorted(_GPT2_PRE | _DIGITS_PRE)
    raise ValueError(f"unsupported GGUF pre-tokenizer {name!r} (supported: {supported})")


def _added(tokens: list[str], types: list[int], kind: int, special: bool) -> list[AddedToken]:
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_kind in zip(tokens, types, strict=True)
        if token_kind == kind
    ]


def _add_bos_eos(backend: BackendTokenizer, reader: GGUFReader, tokens: list[str]) -> None:
    """Honour tokenizer.ggml.add_bos_token / add_eos_token for encode(add_special_tokens=True)."""
    single, special = "$A", []
    bos, eos = (_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        single = f"{tokens[bos]} {single}"
        special.append((tokens[bos], int(bos)))
    if _field(reader, "tokenizer.ggml.add_eos_token", False) and eos is not None:
        single = f"{single} {tokens[eos]}"
        special.append((tokens[eos], int(eos)))
    if special:
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B:1", special_tokens=special
        )
