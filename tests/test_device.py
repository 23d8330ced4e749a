import os
import subprocess
import sys

import pytest
import torch

from services.engine import device


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ({"avx2", "fma"}, torch.float32),  # EPYC, AVX2 only
        ({"avx2", "avx512f", "avx512_bf16"}, torch.float32),  # AVX-512 BF16 without AMX
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, torch.bfloat16),  # AMX
        (set(), torch.float32),  # /proc/cpuinfo unreadable
    ],
)
def test_auto_dtype_on_cpu_is_float32_unless_amx(monkeypatch, flags, dtype):
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    assert device.choose_dtype(torch.device("cpu")) == dtype


def test_explicit_dtype_wins_and_bad_names_are_refused():
    assert device.choose_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        device.choose_dtype(torch.device("cpu"), "int8")


def test_this_machine_flags_are_read():
    assert device.cpu_flags(), "no flags line in /proc/cpuinfo"


def test_a_failed_kernel_build_falls_back_to_torch_and_says_so(tmp_path):
    """No working compiler: the engine still serves, on torch ops in the CPU's own dtype
    (bfloat16 with AMX, else float32), and logs why."""
    script = (
        "from services.engine.worker import Worker, WorkerOptions\n"
        "from services.engine.runner import SeqChunk\n"
        "w = Worker(WorkerOptions(model='default', kv_cache_tokens=256))\n"
        "table = w.pool.blocks.allocate(1)\n"
        "logits = w.runner.forward([SeqChunk([1, 2, 3], 0, table)])\n"
        "print('INFO', w.info.weight_format, w.info.batch_invariant, repr(w.info.kernels))\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "LLMSERVE_KERNEL_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dtype = str(device.choose_dtype(torch.device("cpu"))).removeprefix("torch.")
    assert f"INFO {dtype} False ''" in done.stdout
    assert "the CPU kernels could not be built or loaded" in done.stderr
