"""bench/roofline.py on a small dummy Llama on the CPU: the bytes and FLOPs it counts, and a
run end to end (the GPU numbers come from the same code on a GPU)."""

import json
import subprocess
import sys

import pytest

from bench.roofline import matmul_weights, prefill_flops
from services.engine.config import ModelConfig
from services.engine.loader import load_config
from tests.conftest import ROOT

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 500,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


@pytest.fixture
def tiny_model(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return f"dummy:{tmp_path}"


def test_flops_and_weights_are_counted_from_the_config(tiny_model):
    config: ModelConfig = load_config(tiny_model)
    # Per layer: q/k/v 64 x (64 + 2 * 32), o 64 x 64, gate/up 64 x 256, down 128 x 64.
    per_layer = 64 * 128 + 64 * 64 + 64 * 256 + 128 * 64
    assert matmul_weights(config) == 2 * per_layer
    tokens = 10
    attention = 4 * 2 * 4 * 16 * (tokens * 11 / 2)
    assert prefill_flops(config, tokens) == 2 * 2 * per_layer * tokens + 2 * 64 * 500 + attention


def test_a_run_reports_decode_bandwidth_and_prefill_throughput(tiny_model, tmp_path):
    out = tmp_path / "roofline.json"
    cmd = [
        sys.executable, "-m", "bench.roofline", "--model", tiny_model, "--dtype", "float32",
        "--batch", "1", "3", "--context", "40", "--steps", "4", "--prefill-tokens", "64",
        "--repeats", "1", "--peak-bandwidth", "50", "--peak-tflops", "2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["peak_bandwidth_gb_s"] == 50
    # Dense float32 weights read per step: everything but the (untied) embedding table.
    layers = 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64 + 2 * 64)
    expected_weights = 4 * (layers + 64 + 64 * 500)
    for row, batch in zip(report["decode"], [1, 3], strict=True):
        assert row["batch"] == batch and row["weight_bytes"] == expected_weights
        # K and V, 2 layers x 2 KV heads x 16 dims, float32, for the mean context of the steps.
        assert row["kv_bytes"] == batch * (40 + 2) * 2 * 2 * 2 * 16 * 4
        step_s = row["step_ms"] / 1e3
        assert row["tokens_per_s"] == pytest.approx(batch / step_s)
        bandwidth = (row["weight_bytes"] + row["kv_bytes"]) / step_s / 1e9
        assert row["bandwidth_gb_s"] == pytest.approx(bandwidth)
        assert row["bandwidth_share"] == pytest.approx(bandwidth / 50)
    prefill = report["prefill"]
    assert prefill["tokens"] == 64 and prefill["seconds"] > 0
    assert prefill["tflops"] == pytest.approx(
        prefill_flops(load_config(tiny_model), 64) / prefill["seconds"] / 1e12
    )
    assert prefill["tflops_share"] == pytest.approx(prefill["tflops"] / 2)
    assert "decode batch   3 x 40 tokens" in done.stdout
