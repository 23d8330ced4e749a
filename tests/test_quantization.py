"""Weight-only int4 (Q4_1 blocks on our kernels) and int8: the quantized matmuls against the
float ones, and the quantized models' next-token predictions against the unquantized model's
on the real weights."""

import pytest
import torch

from services.engine import loader
from services.engine.block_linear import BlockLinear
from services.engine.kv_pool import KVPool
from services.engine.model import build_model
from services.engine.quantization import Int8Linear, q4_1_blocks, q8_0_blocks, quantize
from services.engine.runner import ModelRunner, SeqChunk
from services.engine.weights import load_weights
from services.engine.worker import Worker, WorkerOptions
from tests.engine_reference import as_matmul_inputs

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
    with pytest.raises(ValueError, match="int2"):
        quantize(None, "int2")  # type: ignore[arg-type]


def test_int4_blocks_round_to_the_nearest_level_and_multiply_exactly():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 576, generator=generator)
    blocks = q4_1_blocks(weight)
    values = blocks.dequantize().view(96, 18, 32)
    groups = weight.view(96, 18, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    # Nearest of the block's 16 levels (float16 scale and minimum: a little slack).
    assert ((values - groups).abs() <= step[..., None] * 0.51 + 1e-3).all()
    x = torch.randn(5, 576, generator=generator)
    got = BlockLinear(blocks)(x)
    expected = (as_matmul_inputs(x).double() @ blocks.dequantize().double().T).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def teacher_forced_logits(quantization: str) -> list[torch.Tensor]:
    config = loader.load_config("default")
    weights = load_weights("default", torch.float32)
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


def test_int8_blocks_for_the_int4_head_round_to_nearest():
    weight = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    blocks = q8_0_blocks(weight)
    step = weight.view(64, 18, 32).abs().amax(-1) / 127
    error = (blocks.dequantize().view(64, 18, 32) - weight.view(64, 18, 32)).abs()
    assert (error <= step[..., None] * 0.51 + 1e-4).all()


def test_int4_on_a_float_checkpoint_is_batch_invariant_on_the_kernels():
    worker = Worker(WorkerOptions(model="dummy", kv_cache_tokens=256, quantization="int4"))
    info = worker.info
    assert (info.weight_format, info.dtype, info.batch_invariant) == ("int4", "float32", True)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_model_predicts_like_the_unquantized_one(method):
    full, quantized = teacher_forced_logits("none"), teacher_forced_logits(method)
    agree = total = 0
    for a, b in zip(full, quantized, strict=True):
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
        assert ((a - b).norm() / a.norm()).item() < 0.05
    assert agree / total >= 0.9, (agree, total)
    tokenizer = loader.load_tokenizer("default")
    assert tokenizer.decode([int(quantized[0][-1].argmax())]).strip() == "Paris"
