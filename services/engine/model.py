"""Llama-architecture decoder (RMSNorm, rotary, GQA, SwiGLU) over a paged KV cache.

The model is shape-agnostic about batching: it takes a flat run of new tokens from any
number of sequences plus `AttentionMetadata` saying where each token's K/V goes and
which cached blocks each sequence attends to. Prefill and decode use the same forward.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.config import ModelConfig


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] blocks of each sequence, in order
    attn_mask: torch.Tensor  # [num_seqs, 1, max_query_len, max_blocks * block_size] bool
    # [num_tokens] row of each token in the padded [num_seqs * max_query_len] query layout;
    # None when every sequence has exactly one query token (a pure decode step).
    query_rows: torch.Tensor | None
    max_query_len: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@dataclass(slots=True)
class RotaryAngles:
    cos: torch.Tensor
    sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, num_heads, head_dim]."""
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = self.cos, self.sin
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Rotary(nn.Module):
    """Rotate-half rotary embedding with a precomputed cos/sin table. The table rows of a
    forward pass's positions are looked up once (`angles`) and used by every layer."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # [num_tokens, 1, head_dim / 2]
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        return RotaryAngles(cos, sin)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qk_size = q_size + kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryAngles,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # Q's and K's heads side by side, rotated in one pass.
        qk = qkv[:, : self.qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, -1)
        q, k = rotary.rotate(qk).split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)

        # kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]
        kv_slots = kv_cache.view(2, -1, self.num_kv_heads, self.head_dim)
        kv_slots.index_copy_(1, meta.slot_mapping, torch.stack((k, v)))
        out = self._attend(q, kv_cache, meta)
        return self.o_proj(out)

    def _attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_seqs, max_q = meta.block_tables.shape[0], meta.max_query_len
        group = self.num_heads // self.num_kv_heads
        hd, kvh = self.head_dim, self.num_kv_heads
        if meta.query_rows is None:
            q_pad = q.contiguous()
        else:
            q_pad = q.new_zeros(num_seqs * max_q, self.num_heads, hd)
            q_pad[meta.query_rows] = q
        # Queries of one KV head's group are stacked so K/V are never repeated per head.
        q_grouped = (
            q_pad.view(num_seqs, max_q, kvh, group, hd)
            .permute(0, 2, 3, 1, 4)
            .reshape(num_seqs, kvh, group * max_q, hd)
        )
        # One gather for K and V: [2, num_seqs * max_blocks, block_size * kvh * hd], then
        # [2, num_seqs, context, kvh, hd] -> K and V as [num_seqs, kvh, context, hd].
        blocks = kv_cache.flatten(2).index_select(1, meta.block_tables.flatten())
        keys, values = blocks.view(2, num_seqs, -1, kvh, hd).transpose(2, 3).unbind(0)
        mask = meta.attn_mask
        if group > 1:
            mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).flatten(2, 3)
        out = F.scaled_dot_product_attention(q_grouped, keys, values, attn_mask=mask)
        # [num_seqs, kvh, group * max_q, hd] -> [num_seqs * max_q, num_heads * hd]
        out = out.view(num_seqs, kvh, group, max_q, hd).permute(0, 3, 1, 2, 4)
        out = out.reshape(num_seqs * max_q, self.num_heads * hd)
        return out if meta.query_rows is None else out[meta.query_rows]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
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
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
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
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, kvh, hd]
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [num_logits] tokens whose next-token logits are wanted
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rotary = self.rotary.angles(positions, x.dtype)
        for layer, layer_cache in zip(self.layers, kv_cache, strict=True):
            x = layer(x, rotary, layer_cache, meta)
        x = self.norm(x[logits_indices])
        logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        return logits.float()  # [num_logits, vocab_size]

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Loads Hugging Face Llama names, fusing q/k/v and gate/up into single matmuls."""
        own: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            own[f"layers.{i}.input_layernorm.weight"] = weights[p + "input_layernorm.weight"]
            own[f"layers.{i}.post_attention_layernorm.weight"] = weights[
                p + "post_attention_layernorm.weight"
            ]
            own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [weights[attn + f"{n}_proj.weight"] for n in "qkv"]
            )
            own[f"layers.{i}.self_attn.o_proj.weight"] = weights[attn + "o_proj.weight"]
            own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]]
            )
            own[f"layers.{i}.mlp.down_proj.weight"] = weights[mlp + "down_proj.weight"]
        own["embed_tokens.weight"] = weights["model.embed_tokens.weight"]
        own["norm.weight"] = weights["model.norm.weight"]
        if self.lm_head is not None:
            own["lm_head.weight"] = weights["lm_head.weight"]
        self.load_state_dict(own, strict=True, assign=True)


def build_model(
    config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device
) -> LlamaModel:
    """Builds on the meta device (no throwaway init) and assigns the loaded weights."""
    with torch.device("meta"):
        model = LlamaModel(config)
    model.load_hf_weights(weights)
    model.rotary = Rotary(config.head_dim, config.rope_theta, config.max_position_embeddings)
    return model.to(device).eval()
