"""Which weight format the model's matmuls use, and weight-only int4/int8 for float checkpoints.

`--quantization`: `gguf` keeps a GGUF file's Q4_1/Q8_0 blocks as they are and multiplies with
our float32 CPU kernels (the default for a GGUF on the CPU: `auto`); `none` dequantizes to
the compute dtype; `int4` rounds a float checkpoint's layer matmuls to GGUF Q4_1 blocks
(groups of 32 inputs, a float16 scale and minimum each) and its output head to Q8_0 blocks
(as Q4_1 GGUF files store it) and runs them on the same kernels, float32 and batch
invariant; `int8` is described below.

At small batches a decode step is bound by reading the weights: int8 weights with one scale
per output channel read half the bytes of bfloat16 (a quarter of float32), and the CPU kernel
(`torch._weight_int8pack_mm`) dequantizes as it multiplies. Activations, the embedding
lookup, norms and the KV cache stay in the compute dtype. Opt-in (`--quantization int8`): it
changes the model's numbers slightly (on the default model, float32: logits within 4 %
relative L2 of the unquantized ones, the same next-token choices on the tested prompts).
"""

import logging
from collections.abc import Callable

import torch
from torch import nn

from services.engine import kernels
from services.engine.block_linear import BlockLinear, BlockQuantized
from services.engine.device import choose_dtype
from services.engine.kernels.packing import Q4_1, Q8_0, can_pack
from services.engine.model import LlamaModel

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "gguf", "none", "int4", "int8")
# Formats multiplied by our float32 CPU kernels.
KERNEL_FORMATS = ("gguf", "int4")


def resolve_quantization(requested: str, model_kind: str, device: torch.device) -> str:
    """`auto` -> `gguf` for a GGUF file on the CPU, else `none`; impossible choices raise."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization {requested!r} is not one of {QUANTIZATIONS}")
    on_kernels = device.type == "cpu" and kernels.available()
    if requested == "auto":
        return "gguf" if model_kind == "gguf" and on_kernels else "none"
    if requested == "gguf" and (model_kind != "gguf" or device.type != "cpu"):
        raise ValueError("--quantization gguf needs a GGUF model on the CPU")
    if requested in KERNEL_FORMATS and not on_kernels:
        raise ValueError(f"--quantization {requested} needs the CPU kernels, which did not load")
    if requested in ("int4", "int8") and device.type != "cpu":
        raise ValueError(f"--quantization {requested} runs on the CPU only")
    return requested


def compute_dtype(quantization: str, device: torch.device, requested: str = "auto") -> torch.dtype:
    """What an engine computes in: our block kernels take float32 activations (the choice
    for --dtype auto), other dtypes need dense weights; without the kernels, choose_dtype's."""
    if quantization in KERNEL_FORMATS and requested == "auto":
        return torch.float32
    dtype = choose_dtype(device, requested)
    if quantization in KERNEL_FORMATS and dtype != torch.float32:
        raise ValueError(
            f"--quantization {quantization} computes in float32, not {dtype}; "
            "pass --quantization none to run dense weights in another dtype"
        )
    return dtype


def q4_1_blocks(weight: torch.Tensor) -> BlockQuantized:
    """Rounds [out, in] to GGUF Q4_1 rows: per 32 inputs a float16 scale d and minimum m, and
    q in 0..15 nearest to (w - m) / d, against the float16 d and m the kernels will use."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // 32, 32)
    minimum = w.amin(-1).half()
    scale = ((w.amax(-1) - minimum.float()) / 15).half()
    step = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    q = ((w - minimum.float()[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # byte i: input i low, input i + 16 high
    halves = [t.unsqueeze(-1).view(torch.uint8) for t in (scale, minimum)]
    rows = torch.cat([*halves, nibbles], dim=-1).reshape(out_features, -1)
    return BlockQuantized(Q4_1, rows.contiguous(), in_features)


def q8_0_blocks(weight: torch.Tensor) -> BlockQuantized:
    """Rounds [out, in] to GGUF Q8_0 rows: per 32 inputs a float16 scale d and q in
    -127..127 nearest to w / d."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // 32, 32)
    scale = (w.abs().amax(-1) / 127).half()
    step = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    q = (w / step[..., None]).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
    rows = torch.cat([scale.unsqueeze(-1).view(torch.uint8), q], dim=-1)
    return BlockQuantized(Q8_0, rows.reshape(out_features, -1).contiguous(), in_features)


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
        raise ValueError(f"--quantization {method} runs on the CPU only")
    convert = _block_linear(q4_1_blocks) if method == "int4" else Int8Linear
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = convert(attn.qkv_proj.weight)
        attn.o_proj = convert(attn.o_proj.weight)
        mlp.gate_up_proj = convert(mlp.gate_up_proj.weight)
        mlp.down_proj = convert(mlp.down_proj.weight)
    # A tied head keeps the embedding table for lookups and gets a quantized copy for logits;
    # int4 gives it 8 bits, as Q4_1 GGUF files do (4 bits there move logits by ~8 %).
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = _block_linear(q8_0_blocks)(head) if method == "int4" else convert(head)


def _block_linear(
    to_blocks: Callable[[torch.Tensor], BlockQuantized],
) -> Callable[[torch.Tensor], nn.Module]:
    def convert(weight: torch.Tensor) -> nn.Module:
        if can_pack(Q4_1, *weight.shape):
            return BlockLinear(to_blocks(weight))
        log.warning("a %s weight does not fit the kernels' tiles: it stays dense", weight.shape)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return linear

    return convert
