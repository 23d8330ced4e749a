"""Everything a prefill or decode instance computes with: model, KV pool, runner, sampler."""

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from services.engine import kernels, loader
from services.engine.attention import in_place
from services.engine.block_linear import BlockLinear
from services.engine.compute_lock import ComputeLock
from services.engine.config import EngineInfo, ModelConfig
from services.engine.device import (
    choose_device,
    choose_dtype,
    free_memory_bytes,
    memory_limit_bytes,
)
from services.engine.kv_pool import KVPool, kv_bytes_per_token
from services.engine.model import LlamaModel, build_model
from services.engine.quantization import (
    KERNEL_FORMATS,
    compute_dtype,
    quantize,
    resolve_quantization,
)
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler
from services.engine.weights import load_weights

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerOptions:
    model: str
    # The KV pool's size: in tokens, in bytes, or as a share of the free memory; with none
    # of them, `default_kv_cache_share` of the device's memory, at most
    # `max_default_kv_cache_tokens`.
    kv_cache_tokens: int | None = None
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float | None = None
    default_kv_cache_share: float = 0.25
    max_default_kv_cache_tokens: int = 65536
    block_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # see kv_cache_dtype()
    shared_kv: bool = False  # pool in host shared memory (prefill, for same-host decode)
    quantization: str = "auto"  # services.engine.quantization.QUANTIZATIONS
    compute_lock: str | None = None  # a file shared with the host's other engines
    # Nice levels the compute threads run below the process's others (lower_compute_priority).
    compute_nice: int = 0


def kv_cache_dtype(
    requested: str, compute: torch.dtype, device: torch.device, head_dim: int
) -> torch.dtype:
    """What the KV pool stores. auto: float16 where our CPU attention computes in float32 (it
    widens each value exactly; half the memory and bandwidth of float32), else the compute
    dtype."""
    if requested == "auto":
        on_kernels = compute == torch.float32 and kernels.serves_attention(device, head_dim)
        return torch.float16 if on_kernels else compute
    dtype = choose_dtype(device, requested)
    if device.type == "cpu" and dtype != compute and compute != torch.float32:
        raise ValueError(f"a {dtype} KV cache on the CPU needs float32 compute, not {compute}")
    return dtype


class PoolSizeError(ValueError):
    """The KV pool asked for cannot be had: a start-up error."""


def kv_pool_tokens(options: WorkerOptions, bytes_per_token: int, device: torch.device) -> int:
    """The pool's size in tokens, checked against the memory it would need. A CPU pool takes
    memory as its blocks are first written, so it must fit in what is available, not more."""
    if options.kv_cache_tokens is not None:
        tokens = options.kv_cache_tokens
    elif options.kv_cache_memory is not None:
        tokens = options.kv_cache_memory // bytes_per_token
    elif options.kv_cache_memory_fraction is not None:
        fraction = options.kv_cache_memory_fraction
        if not 0 < fraction <= 1:
            raise PoolSizeError(f"--kv-cache-memory-fraction {fraction} is not in (0, 1]")
        tokens = int(free_memory_bytes(device) * fraction) // bytes_per_token
    else:
        budget = int(memory_limit_bytes(device) * options.default_kv_cache_share)
        tokens = min(options.max_default_kv_cache_tokens, budget // bytes_per_token)
    if tokens < options.block_size:
        raise PoolSizeError(
            f"a KV pool of {tokens} tokens holds no block of {options.block_size} tokens "
            f"({bytes_per_token} bytes a token)"
        )
    available = free_memory_bytes(device)
    if tokens * bytes_per_token > available:
        raise PoolSizeError(
            f"a KV pool of {tokens} tokens needs {_gib(tokens * bytes_per_token)} "
            f"({bytes_per_token} bytes a token) but {device} has {_gib(available)} available; "
            "give a smaller --kv-cache-tokens or --kv-cache-memory"
        )
    return tokens


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    storages = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class Worker:
    def __init__(self, options: WorkerOptions) -> None:
        start = time.monotonic()
        self.device = choose_device(options.device)
        self.quantization = resolve_quantization(
            options.quantization, loader.resolve(options.model).kind, self.device
        )
        kernel_weights = self.quantization in KERNEL_FORMATS
        self.dtype = compute_dtype(self.quantization, self.device, options.dtype)
        self.config: ModelConfig = loader.load_config(options.model)
        weights = load_weights(options.model, self.dtype, keep_blocks=self.quantization == "gguf")
        self.model: LlamaModel = build_model(self.config, weights, self.device)
        del weights
        quantize(self.model, self.quantization)
        self._kernel_threads = kernel_weights
        if kernel_weights:  # every op of a step is ours: give our kernels the CPU
            kernels.take_cpu_threads()
        self._compute_nice = options.compute_nice
        self.kv_dtype = kv_cache_dtype(
            options.kv_cache_dtype, self.dtype, self.device, self.config.head_dim
        )
        num_tokens = kv_pool_tokens(
            options, kv_bytes_per_token(self.config, self.kv_dtype), self.device
        )
        self.pool = KVPool(
            self.config,
            num_tokens,
            options.block_size,
            self.kv_dtype,
            self.device,
            options.shared_kv,
        )
        self.kv_cache_bytes = self.pool.cache.numel() * self.pool.cache.element_size()
        self.weight_bytes = tensor_bytes(self.model)
        lock = ComputeLock(options.compute_lock) if options.compute_lock else None
        if lock is not None and self.device.type == "cpu":
            log.info("forward passes take turns with this host's other engines (%s)", lock.path)
        self.runner = ModelRunner(self.model, self.pool, self.device, lock)
        self.sampler = Sampler(self.device)
        self.info = self._describe()  # fixed from here on; every Info RPC reports it
        log.info(
            "loaded %s (%s, quantization %s, %s) in %.1fs: weights %.0f MiB; %s KV pool %d "
            "tokens (%d blocks of %d), %.0f MiB",
            self.config.model_id,
            self.dtype,
            self.quantization,
            self.device,
            time.monotonic() - start,
            self.weight_bytes / 2**20,
            self.info.kv_cache_dtype,
            self.pool.num_blocks * options.block_size,
            self.pool.num_blocks,
            options.block_size,
            self.kv_cache_bytes / 2**20,
        )

    def lower_compute_priority(self) -> None:
        """Called on the engine's thread: it and our kernels' threads run `compute_nice`
        levels below the process's other threads, so that the event loop (streaming tokens,
        taking requests) and the host's other services preempt a step instead of waiting for
        a core until it ends. The work is the same; only who waits changes. Linux only (a
        thread's id is a priority's target there); a refusal is logged, never fatal."""
        if not self._compute_nice or not sys.platform.startswith("linux"):
            return
        threads = [threading.get_native_id()]
        if self._kernel_threads:
            threads += kernels.worker_thread_ids()
        try:
            nice = min(os.getpriority(os.PRIO_PROCESS, os.getpid()) + self._compute_nice, 19)
            for thread in threads:
                os.setpriority(os.PRIO_PROCESS, thread, nice)
        except OSError as exc:
            log.warning("could not lower the compute threads' priority: %s", exc)
            return
        log.info("compute threads %s run at nice +%d", threads, self._compute_nice)

    def _describe(self) -> EngineInfo:
        linears = [m for m in self.model.modules() if isinstance(m, BlockLinear | nn.Linear)]
        formats = sorted({m.fmt.name for m in linears if isinstance(m, BlockLinear)})
        if self.quantization == "gguf":
            weight_format = "gguf:" + "+".join(formats)
        elif self.quantization in ("int4", "int8"):
            weight_format = self.quantization
        else:
            weight_format = self.dtype_name
        kernels_used = in_place(self.pool.cache, self.config.head_dim)
        return EngineInfo(
            dtype=self.dtype_name,
            device=str(self.device),
            weight_format=weight_format,
            kernels=kernels.load() if kernels_used else "",
            # Every matmul and attention in our fixed-order kernels (dense float weights go
            # through BLAS, whose reduction order depends on the batch).
            batch_invariant=kernels_used
            and not any(isinstance(m, nn.Linear) for m in linears)
            and self.quantization in KERNEL_FORMATS,
            kv_cache_dtype=str(self.kv_dtype).removeprefix("torch."),
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")
