"""CPU kernels of our own (C++), built for this machine's instruction set on first use.

`load()` compiles the kernels (`quant_linear.cpp`, `vnni_linear.cpp`, `paged_attention.cpp`,
`layer_ops.cpp`, `decoder_layers.cpp`, `logit_filters.cpp`, split over the threads of
`thread_pool.cpp`) with the machine's compiler for the widest extensions the CPU has (AMX,
else AVX-512 with or without VNNI, else AVX2, else portable code) and registers them as
`torch.ops.llmserve.*`. The build is cached beside this file (or under
`LLMSERVE_KERNEL_DIR`), one library per variant, sources, flags and torch version;
`scripts/setup.sh` builds this machine's variant (`python -m services.engine.kernels`), so
services start without compiling. `LLMSERVE_KERNEL_VARIANT` forces a variant.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from services.engine.device import cpu_flags

log = logging.getLogger(__name__)

_SOURCES = (
    "quant_linear.cpp",
    "vnni_linear.cpp",
    "paged_attention.cpp",
    "layer_ops.cpp",
    "decoder_layers.cpp",
    "logit_filters.cpp",
    "thread_pool.cpp",
)
_HEADERS = ("simd.h", "quant_tiles.h", "amx_tiles.h", "thread_pool.h")
_HERE = Path(__file__).resolve().parent
# Each variant's flags name exactly what its code may use, so a build runs on any CPU with them.
_VNNI_NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma", "f16c")
_VNNI_FLAGS = [
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512vnni",
    "-mavx2",
    "-mfma",
    "-mf16c",
]
_VARIANTS = {
    # Matmuls on int16 activations (vnni_linear.cpp; Q4_1 from 32 rows on AMX tiles,
    # amx_tiles.h); the others keep float32 activations.
    "amx": (
        (*_VNNI_NEEDS, "avx512_bf16", "amx_tile", "amx_bf16"),
        [*_VNNI_FLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
    ),
    "avx512vnni": (_VNNI_NEEDS, _VNNI_FLAGS),
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    ),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "portable": ((), []),
}
# -ffp-contract=fast: a * b + c is one fused multiply-add wherever the variant has FMA.
_COMMON_FLAGS = ["-O3", "-ffp-contract=fast"]


def cpu_variant() -> str:
    flags = cpu_flags()
    forced = os.environ.get("LLMSERVE_KERNEL_VARIANT")
    if forced:
        if forced not in _VARIANTS:
            raise ValueError(f"LLMSERVE_KERNEL_VARIANT={forced!r} is not one of {list(_VARIANTS)}")
        return forced
    return next(name for name, (needs, _) in _VARIANTS.items() if set(needs) <= flags)


@functools.cache
def take_cpu_threads() -> int:
    """Our kernels get the threads torch would use (--threads) and torch keeps one: two
    thread teams on the same cores wait on each other at every step. Once per process;
    returns the count."""
    load()
    threads = torch.get_num_threads()
    torch.ops.llmserve.set_num_threads(threads)
    torch.set_num_threads(1)
    return threads


def worker_thread_ids() -> list[int]:
    """The OS thread ids of our kernels' threads besides the calling one."""
    load()
    return list(torch.ops.llmserve.worker_thread_ids())


@functools.cache
def available() -> bool:
    """Whether the kernels load (building them if needed). If they cannot (no compiler, a
    failed build), the engine falls back to torch ops: dense weights, not batch invariant,
    several times slower. That is logged as an error, never silent."""
    try:
        load()
    except Exception as exc:  # noqa: BLE001 - any build or load failure means the fallback
        log.error(
            "the CPU kernels could not be built or loaded (%s); falling back to torch ops: "
            "dense weights, not batch invariant, slower. `python -m services.engine.kernels` "
            "shows the build output.",
            exc,
        )
        return False
    return True


def serves(tensor: torch.Tensor) -> bool:
    """Our kernels compute float32 on the CPU; everything else goes to torch."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and available()


# The head sizes our attention is compiled for (paged_attention.cpp).
ATTENTION_HEAD_DIMS = (32, 64, 128, 256)


def serves_attention(device: torch.device, head_dim: int) -> bool:
    """Our attention runs on the CPU, for heads of ATTENTION_HEAD_DIMS."""
    return device.type == "cpu" and head_dim in ATTENTION_HEAD_DIMS and available()


def serves_cache(cache: torch.Tensor, head_dim: int) -> bool:
    """Our attention reads a float32 or float16 KV cache (computing in float32)."""
    return cache.dtype in (torch.float32, torch.float16) and serves_attention(
        cache.device, head_dim
    )


def matmul_inputs() -> str:
    """What the quantized matmuls multiply the weights with: "int16" (activations rounded
    per row and 32-input block, vnni_linear.cpp) or "float32"."""
    return "int16" if load() in ("amx", "avx512vnni") else "float32"


def cache_root() -> Path:
    """Where built kernels (and tile_files' packed weights) are kept."""
    return Path(os.environ.get("LLMSERVE_KERNEL_DIR", _HERE / "build"))


def _build_dir(variant: str) -> Path:
    sources = b"".join((_HERE / name).read_bytes() for name in (*_SOURCES, *_HEADERS))
    flags = " ".join([*_COMMON_FLAGS, *_VARIANTS[variant][1]]).encode()
    digest = hashlib.sha256(sources + flags + torch.__version__.encode()).hexdigest()[:12]
    return cache_root() / f"{variant}-{digest}"


def library_path() -> Path:
    """The shared library of this machine's variant of these sources (built or not)."""
    return _library(cpu_variant())


def _library(variant: str) -> Path:
    return _build_dir(variant) / f"llmserve_kernels_{variant}.so"


@functools.cache
def load() -> str:
    """Loads the kernels, building them first if this variant of these sources was never
    built; returns the variant loaded. A compiler without AMX support builds `avx512vnni`
    instead, with a warning."""
    variant = cpu_variant()
    try:
        _load_variant(variant)
    except Exception as exc:
        if variant != "amx":
            raise
        log.warning(
            "the CPU kernels' AMX build failed (%s); using avx512vnni instead (a compiler "
            "with -mamx-bf16, such as GCC 11 or later, builds it)",
            str(exc)[-2000:],
        )
        variant = "avx512vnni"
        _load_variant(variant)
    has_tiles = {"amx_tile", "amx_bf16"} <= cpu_flags()
    if variant == "amx" and has_tiles and not torch.ops.llmserve.amx_tiles_permitted():
        log.warning(
            "this CPU has AMX but the kernel refused this process its tile registers "
            "(arch_prctl ARCH_REQ_XCOMP_PERM); Q4_1 matmuls run on AVX-512 VNNI instead "
            "(slower prefill)"
        )
    return variant


def _load_variant(variant: str) -> None:
    library = _library(variant)
    if not library.exists():
        _build(variant, library.parent)
    torch.ops.load_library(str(library))


def _build(variant: str, build_dir: Path) -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip package's binary, outside an activated venv
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    cpp_extension.load(
        name=f"llmserve_kernels_{variant}",
        sources=[str(_HERE / name) for name in _SOURCES],
        extra_cflags=[*_COMMON_FLAGS, *_VARIANTS[variant][1]],
        extra_include_paths=[str(_HERE)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    log.info("built the CPU kernels (%s) in %.1fs", variant, time.monotonic() - start)
