"""Chooses the device and compute dtype an engine runs in."""

import os
import pathlib

import torch

# bfloat16 pays on a CPU only with AMX tiles. AVX-512 BF16 alone is slower than float32 on
# Xeons and 2.4x slower at batch 16 on EPYCs, and on every CPU it changes greedy answers
# (docs/architecture.md, "Compute dtype").
_FAST_BF16_CPU_FLAGS = ("amx_bf16",)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_fast_bf16() -> bool:
    return any(flag in cpu_flags() for flag in _FAST_BF16_CPU_FLAGS)


def choose_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        dtype = getattr(torch, requested, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"unsupported dtype {requested!r}")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


# cgroup v2, then v1: the memory limit of the container the process runs in.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_limit_bytes(device: torch.device) -> int:
    """What the device holds: the GPU's memory, or the host's RAM bounded by the cgroup's
    memory limit (a container's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = pathlib.Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            limit = min(limit, int(text))
    return limit


def free_memory_bytes(device: torch.device) -> int:
    """Memory a KV pool could still take: free GPU memory, or MemAvailable on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")
