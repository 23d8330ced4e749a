"""Weight-only int8: the quantized matmul against the float one, and the quantized model's
next-token predictions against the unquantized model's on the real weights."""

import pytest
import torch

from services.engine import loader
from services.engine.kv_pool import KVPool
from services.engine.model import build_model
from services.engine.quantization import Int8Linear, quantize
from services.engine.runner import ModelRunner, SeqChunk

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at a temperature of",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_the_float_matmul(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 576, generator=generator).to(dtype)
    x = torch.randn(2, 3, 576, generator=generator).to(dtype)
    expected = torch.nn.functional.linear(x.float(), weight.float())
    got = Int8Linear(weight)(x)
    assert got.shape == (2, 3, 384) and got.dtype == dtype
    assert ((got.float() - expected).norm() / expected.norm()).item() < 0.02


def test_quantize_refuses_unknown_methods():
    with pytest.raises(ValueError, match="int4"):
        quantize(None, "int4")  # type: ignore[arg-type]


def teacher_forced_logits(quantization: str) -> list[torch.Tensor]:
    config = loader.load_config("default")
    weights = loader.load_weights("default", torch.float32)
    model = build_model(config, weights, torch.device("cpu"))
    quantize(model, quantization)
    pool = KVPool(config, 1024, 16, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, pool, torch.device("cpu"))
    tokenizer = loader.load_tokenizer("default")
    logits = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        table = pool.blocks.allocate(-(-len(ids) // 16))
        chunk = SeqChunk(ids, 0, table, all_logits=True)
        logits.append(runner.forward([chunk]))
        pool.blocks.free(table)
    return logits


def test_int8_model_predicts_like_the_unquantized_one():
    full, int8 = teacher_forced_logits("none"), teacher_forced_logits("int8")
    agree = total = 0
    for a, b in zip(full, int8, strict=True):
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
        assert ((a - b).norm() / a.norm()).item() < 0.05
    assert agree / total >= 0.9, (agree, total)
    tokenizer = loader.load_tokenizer("default")
    assert tokenizer.decode([int(int8[0][-1].argmax())]).strip() == "Paris"
