"""Weight-only int8 quantization of the model's matmuls, for decoding on the CPU.

At small batches a decode step is bound by reading the weights: int8 weights with one scale
per output channel read half the bytes of bfloat16 (a quarter of float32), and the CPU kernel
(`torch._weight_int8pack_mm`) dequantizes as it multiplies. Activations, the embedding
lookup, norms and the KV cache stay in the compute dtype. Opt-in (`--quantization int8`): it
changes the model's numbers slightly (on the default model, float32: logits within 4 %
relative L2 of the unquantized ones, the same next-token choices on the tested prompts).
"""

import torch
from torch import nn

from services.engine.model import LlamaModel

QUANTIZATIONS = ("none", "int8")


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T, q int8 [out, in] rounded from the weight, scale [out]."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        full = weight.detach().float()
        scale = full.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = (full / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized.contiguous())
        self.register_buffer("scale", scale.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        return out.view(*x.shape[:-1], out.shape[-1])


def quantize(model: LlamaModel, method: str) -> None:
    """Replaces the model's linear layers and its output head in place (`none`: no change)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization {method!r} is not one of {QUANTIZATIONS}")
    if method == "none":
        return
    if model.embed_tokens.weight.device.type != "cpu":
        raise ValueError("--quantization int8 runs on the CPU only")
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = Int8Linear(attn.qkv_proj.weight)
        attn.o_proj = Int8Linear(attn.o_proj.weight)
        mlp.gate_up_proj = Int8Linear(mlp.gate_up_proj.weight)
        mlp.down_proj = Int8Linear(mlp.down_proj.weight)
    # A tied head keeps the embedding table for lookups and gets an int8 copy for logits.
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = Int8Linear(head)
