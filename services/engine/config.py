"""The model's shape, as every loader reports it, and the weight layout that shape implies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The model spec of the embedded default model (services/engine/loader.py resolves specs).
# Here, free of torch, for the processes that only name it (the launcher).
DEFAULT_MODEL = "default"


@dataclass(slots=True)
class ModelConfig:
    model_id: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    # Every id that ends generation: the declared eos plus the chat end-of-turn marker(s).
    eos_token_ids: list[int] = field(default_factory=list)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face Llama names and [out, in] shapes, in checkpoint order."""
        hidden, inter = self.hidden_size, self.intermediate_size
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, hidden)
        }
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}."
            shapes[prefix + "input_layernorm.weight"] = (hidden,)
            shapes[prefix + "self_attn.q_proj.weight"] = (q_size, hidden)
            shapes[prefix + "self_attn.k_proj.weight"] = (kv_size, hidden)
            shapes[prefix + "self_attn.v_proj.weight"] = (kv_size, hidden)
            shapes[prefix + "self_attn.o_proj.weight"] = (hidden, q_size)
            shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
            shapes[prefix + "mlp.gate_proj.weight"] = (inter, hidden)
            shapes[prefix + "mlp.up_proj.weight"] = (inter, hidden)
            shapes[prefix + "mlp.down_proj.weight"] = (hidden, inter)
        shapes["model.norm.weight"] = (hidden,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, hidden)
        return shapes

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` body that transformers' LlamaConfig and our HF loader both read."""
        eos: int | list[int] | None = self.eos_token_ids or None
        if isinstance(eos, list) and len(eos) == 1:
            eos = eos[0]
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }


@dataclass(slots=True)
class EngineInfo:
    """How an instance computes, as its Info RPC reports it."""

    dtype: str  # activations and norms
    device: str
    weight_format: str  # "gguf:Q4_1+Q8_0", "int8", or the dense weights' dtype
    kernels: str = ""  # CPU kernel variant in use, "" where torch computes
    batch_invariant: bool = False
    kv_cache_dtype: str = ""
