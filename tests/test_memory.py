"""What an engine's memory goes to: KV pools sized from the machine's memory, taking memory
only as blocks are written, and the sizes reported."""

import argparse
import pathlib
import subprocess
import sys

import pytest
import torch

from services.cli import byte_size
from services.engine.block_linear import BlockEmbedding
from services.engine.device import free_memory_bytes, memory_limit_bytes
from services.engine.kv_pool import KVPool, kv_bytes_per_token
from services.engine.loader import load_config
from services.engine.weights import load_weights
from services.engine.worker import PoolSizeError, Worker, WorkerOptions, kv_pool_tokens

CPU = torch.device("cpu")
TOKEN_BYTES = 46080  # the default model's float32 KV per token


def resident_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4G", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 3 * 2**29), ("1000", 1000)],
)
def test_byte_sizes(text, expected):
    assert byte_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "0"])
def test_bad_byte_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size(text)


def test_the_default_pool_is_a_share_of_the_machine_at_most_the_cap():
    options = WorkerOptions(model="default", default_kv_cache_share=0.25)
    share = int(memory_limit_bytes(CPU) * 0.25) // TOKEN_BYTES
    assert kv_pool_tokens(options, TOKEN_BYTES, CPU) == min(65536, share)
    options.max_default_kv_cache_tokens = 1024
    assert kv_pool_tokens(options, TOKEN_BYTES, CPU) == 1024


def test_explicit_sizes_in_tokens_and_bytes():
    assert kv_pool_tokens(WorkerOptions("default", kv_cache_tokens=4096), TOKEN_BYTES, CPU) == 4096
    options = WorkerOptions("default", kv_cache_memory=100 * TOKEN_BYTES + 5)
    assert kv_pool_tokens(options, TOKEN_BYTES, CPU) == 100


def test_a_pool_that_cannot_fit_is_an_error_naming_the_numbers():
    too_many = free_memory_bytes(CPU) // TOKEN_BYTES + 1000
    with pytest.raises(PoolSizeError, match=rf"{too_many} tokens needs .* GiB.* available"):
        kv_pool_tokens(WorkerOptions("default", kv_cache_tokens=too_many), TOKEN_BYTES, CPU)
    with pytest.raises(PoolSizeError, match="no block"):
        kv_pool_tokens(WorkerOptions("default", kv_cache_tokens=8), TOKEN_BYTES, CPU)


@pytest.mark.parametrize("shared", [False, True])
def test_a_cpu_pool_takes_memory_only_for_blocks_written(shared):
    config = load_config("default")
    assert kv_bytes_per_token(config, torch.float32) == TOKEN_BYTES
    before = resident_bytes()
    pool = KVPool(config, 2**30 // TOKEN_BYTES, 16, torch.float32, CPU, shared_memory=shared)
    assert resident_bytes() - before < 64 * 2**20  # 1 GiB of capacity
    assert not pool.cache[:, :, :8].any()  # reads as zeros
    pool.cache[:, :, :8] = 1.0
    assert pool.cache[:, :, :8].all() and not pool.cache[:, :, 8:16].any()


def test_a_worker_reports_its_weight_and_kv_bytes():
    worker = Worker(WorkerOptions(model="dummy", kv_cache_tokens=256))
    cache = worker.pool.cache
    assert worker.kv_cache_bytes == cache.numel() * cache.element_size()
    params = sum(p.numel() * p.element_size() for p in worker.model.parameters())
    assert (
        0
        < worker.weight_bytes
        <= params + sum(b.numel() * b.element_size() for b in worker.model.buffers())
    )


def test_building_a_model_loads_no_compiler_stack():
    """torch._dynamo and triton cost an engine process seconds and tens of MB: a model is
    built and loaded without them (a fresh interpreter, since tests import what they like)."""
    script = (
        "import sys\n"
        "from services.engine.worker import Worker, WorkerOptions\n"
        "Worker(WorkerOptions(model='dummy', kv_cache_tokens=256))\n"
        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n"
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_metrics_report_each_instances_weight_and_kv_bytes(fake_client, fakes):
    text = fake_client.get("/metrics").text
    decode = f'instance="{fakes.addresses["decode"]}",service="decode"'
    assert f"llmserve_kv_cache_bytes{{{decode}}} 1.179648e+07" in text
    assert f"llmserve_weight_bytes{{{decode}}} 123456.0" in text


def test_the_lookup_table_stays_in_its_blocks_with_the_same_values():
    weights = load_weights("default", torch.float32, keep_blocks=True)
    table = weights["model.embed_tokens.weight"]
    embedding = BlockEmbedding(table)
    ids = torch.tensor([0, 5, 49151, 1234, 5])
    assert torch.equal(embedding(ids), table.dequantize()[ids])
    assert embedding.rows.nbytes < 49152 * 576 * 4 / 3
