"""Which weight format the model's matmuls use, and weight-only int8 for float checkpoints.

`--quantization`: `gguf` keeps a GGUF file's Q4_1/Q8_0 blocks as they are and multiplies with
our float32 CPU kernels (the default for a GGUF on the CPU: `auto`); `none` dequantizes to
the compute dtype; `int8` is described below.

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

QUANTIZATIONS = ("auto", "gguf", "none", "int8")


def resolve_quantization(requested: str, model_kind: str, device: torch.device) -> str:
    """`auto` -> `gguf` for a GGUF file on the CPU, else `none`; impossible choices raise."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization {requested!r} is not one of {QUANTIZATIONS}")
    if requested == "auto":
        return "gguf" if model_kind == "gguf" and device.type == "cpu" else "none"
    if requested == "gguf" and (model_kind != "gguf" or device.type != "cpu"):
        raise ValueError("--quantization gguf needs a GGUF model on the CPU")
    return requested


def compute_dtype(quantization: str, dtype: torch.dtype) -> torch.dtype:
    """GGUF block kernels take float32 activations; other dtypes need dequantized weights."""
    if quantization == "gguf" and dtype != torch.float32:
        raise ValueError(
            f"GGUF block weights compute in float32, not {dtype}; "
            "pass --quantization none to run the dequantized model in another dtype"
        )
    return dtype


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
    if method not in QUANTIZATIONS or method == "auto":
        raise ValueError(f"quantization {method!r} is not one of {QUANTIZATIONS[1:]}")
    if method in ("none", "gguf"):  # gguf: the loader already kept the blocks
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
