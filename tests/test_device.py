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
