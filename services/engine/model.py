"""Llama-architecture decoder (RMSNorm, rotary, GQA, SwiGLU) over a paged KV cache.

The model is shape-agnostic about batching: it takes a flat run of new tokens from any
number of sequences plus `AttentionMetadata` saying where each token's K/V goes and
which cached blocks each sequence attends to. Prefill and decode use the same forward.
Linear layers are `nn.Linear` or, for weights kept in GGUF blocks, `BlockLinear`.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import kernels
from services.engine.attention import AttentionMetadata, Rotary, in_place, rope_attention
from services.engine.block_linear import (
    BlockEmbedding,
    BlockLinear,
    BlockQuantized,
    Weight,
    concat_rows,
)
from services.engine.config import ModelConfig

# Weight formats as llmserve::decoder_layers numbers them.
_FORMATS = {"Q4_1": 0, "Q8_0": 1}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.serves(x):
            return torch.ops.llmserve.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: Rotary,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # kv_cache: [2, num_blocks, num_kv_heads, block_size * head_dim]
        out = rope_attention(qkv, rotary, kv_cache, meta, self.num_heads, self.num_kv_heads)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if kernels.serves(gate_up):
            return self.down_proj(torch.ops.llmserve.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rotary, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Weights come from the file, never from an init: one on the meta device runs torch's
        # reference ops, which import torch._dynamo and triton (seconds and tens of MB per
        # engine process, and triton's leak reports at exit).
        self.embed_tokens = nn.Embedding.from_pretrained(
            torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        with torch.device("cpu"):  # computed, not loaded: real values even when built on meta
            self.rotary = Rotary(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.lm_head: nn.Module | None = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, kvh, block_size * hd]
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [num_logits] tokens whose next-token logits are wanted
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        on_kernels = kernels.serves(x) and in_place(kv_cache, self.config.head_dim)
        weights = self._kernel_weights if on_kernels else None
        if weights is not None:  # every layer in one call of our kernels: same values
            config = self.config
            x = torch.ops.llmserve.decoder_layers(
                x, *weights, self.rotary.cos, self.rotary.sin, kv_cache, meta.slot_mapping,
                meta.block_tables, meta.token_seq, meta.positions, config.num_heads,
                config.num_kv_heads, config.rms_norm_eps, config.head_dim**-0.5,
            )  # fmt: skip
        else:
            for layer, layer_cache in zip(self.layers, kv_cache, strict=True):
                x = layer(x, self.rotary, layer_cache, meta)
        if logits_indices.numel() == 0:  # prompt chunks that sample nothing
            return x.new_zeros((0, self.config.vocab_size), dtype=torch.float32)
        x = self.norm(x[logits_indices])
        logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        return logits.float()  # [num_logits, vocab_size]

    @functools.cached_property
    def _kernel_weights(self) -> tuple[list, list, list[int], list[int]] | None:
        """The layers' weights as `llmserve::decoder_layers` takes them (norms; the q/k/v, o,
        gate/up and down tiles with their formats and input sizes), when every linear layer
        is in a block format of our kernels; else None."""
        linears = [
            linear
            for layer in self.layers
            for linear in (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
        ]
        if not all(isinstance(m, BlockLinear) and m.fmt.name in _FORMATS for m in linears):
            return None
        norms = [
            norm.weight
            for layer in self.layers
            for norm in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        formats = [_FORMATS[m.fmt.name] for m in linears]
        return norms, [m.tiles for m in linears], formats, [m.in_features for m in linears]

    def load_hf_weights(self, weights: dict[str, Weight]) -> None:
        """Loads Hugging Face Llama names, fusing q/k/v and gate/up into single matmuls.
        Weights in GGUF blocks become `BlockLinear`s (a tied head gets its own) and the lookup
        table a `BlockEmbedding`."""
        own: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            own[f"layers.{i}.input_layernorm.weight"] = _dense(
                weights[p + "input_layernorm.weight"]
            )
            own[f"layers.{i}.post_attention_layernorm.weight"] = _dense(
                weights[p + "post_attention_layernorm.weight"]
            )
            linears = {
                "self_attn.qkv_proj": concat_rows(
                    [weights[attn + f"{n}_proj.weight"] for n in "qkv"]
                ),
                "self_attn.o_proj": weights[attn + "o_proj.weight"],
                "mlp.gate_up_proj": concat_rows(
                    [weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]]
                ),
                "mlp.down_proj": weights[mlp + "down_proj.weight"],
            }
            for name, weight in linears.items():
                parent, attr = name.split(".")
                if isinstance(weight, BlockQuantized):
                    setattr(getattr(layer, parent), attr, BlockLinear(weight))
                else:
                    own[f"layers.{i}.{name}.weight"] = weight
        embed = weights["model.embed_tokens.weight"]
        if isinstance(embed, BlockQuantized):
            self.embed_tokens = BlockEmbedding(embed)
        else:
            own["embed_tokens.weight"] = embed
        own["norm.weight"] = _dense(weights["model.norm.weight"])
        head = embed if self.lm_head is None else weights["lm_head.weight"]
        if isinstance(head, BlockQuantized):
            self.lm_head = BlockLinear(head)
        elif self.lm_head is not None:
            own["lm_head.weight"] = head
        missing, unexpected = self.load_state_dict(own, strict=False, assign=True)
        missing = [name for name in missing if not name.endswith((".tiles", ".rows"))]
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit the model: missing {missing}, unexpected {unexpected}"
            )


def _dense(weight: Weight) -> torch.Tensor:
    """Norms are small: float32 is cheap there."""
    return weight.dequantize() if isinstance(weight, BlockQuantized) else weight


def build_model(
    config: ModelConfig, weights: dict[str, Weight], device: torch.device
) -> LlamaModel:
    """Builds on the meta device (no throwaway init) and assigns the loaded weights."""
    with torch.device("meta"):
        model = LlamaModel(config)
    model.load_hf_weights(weights)
    return model.to(device).eval()
