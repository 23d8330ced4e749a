"""Everything a prefill or decode instance computes with: model, KV pool, runner, sampler."""

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from services.engine import kernels, loader
from services.engine.attention import in_place
from services.engine.block_linear import BlockLinear
from services.engine.compute_lock import ComputeLock
from services.engine.config import EngineInfo, ModelConfig
from services.engine.device import choose_device, choose_dtype, free_memory_bytes
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

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerOptions:
    model: str
    kv_cache_tokens: int | None = None  # KV pool size in tokens ...
    kv_cache_memory_fraction: float | None = None  # ... or as a share of free memory
    block_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    shared_kv: bool = False  # pool in host shared memory (prefill, for same-host decode)
    quantization: str = "auto"  # services.engine.quantization.QUANTIZATIONS
    compute_lock: str | None = None  # a file shared with the host's other engines


def kv_pool_tokens(options: WorkerOptions, bytes_per_token: int, device: torch.device) -> int:
    if options.kv_cache_tokens is not None:
        return options.kv_cache_tokens
    fraction = options.kv_cache_memory_fraction
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError("give --kv-cache-tokens, or --kv-cache-memory-fraction in (0, 1]")
    return int(free_memory_bytes(device) * fraction) // bytes_per_token


class Worker:
    def __init__(self, options: WorkerOptions) -> None:
        start = time.monotonic()
        self.device = choose_device(options.device)
        self.quantization = resolve_quantization(
            options.quantization, loader.resolve(options.model).kind, self.device
        )
        kernel_weights = self.quantization in KERNEL_FORMATS
        auto_dtype = "float32" if kernel_weights and options.dtype == "auto" else None
        self.dtype = compute_dtype(
            self.quantization, choose_dtype(self.device, auto_dtype or options.dtype)
        )
        self.config: ModelConfig = loader.load_config(options.model)
        weights = loader.load_weights(
            options.model, self.dtype, keep_blocks=self.quantization == "gguf"
        )
        self.model: LlamaModel = build_model(self.config, weights, self.device)
        del weights
        quantize(self.model, self.quantization)
        if kernel_weights:  # every op of a step is ours: give our kernels the CPU
            kernels.take_cpu_threads()
        num_tokens = kv_pool_tokens(
            options, kv_bytes_per_token(self.config, self.dtype), self.device
        )
        self.pool = KVPool(
            self.config, num_tokens, options.block_size, self.dtype, self.device, options.shared_kv
        )
        lock = ComputeLock(options.compute_lock) if options.compute_lock else None
        if lock is not None and self.device.type == "cpu":
            log.info("forward passes take turns with this host's other engines (%s)", lock.path)
        self.runner = ModelRunner(self.model, self.pool, self.device, lock)
        self.sampler = Sampler(self.device)
        self.info = self._describe()  # fixed from here on; every Info RPC reports it
        log.info(
            "loaded %s (%s, quantization %s, %s) with %d KV blocks of %d tokens in %.1fs",
            self.config.model_id,
            self.dtype,
            self.quantization,
            self.device,
            self.pool.num_blocks,
            options.block_size,
            time.monotonic() - start,
        )

    def _describe(self) -> EngineInfo:
        linears = [m for m in self.model.modules() if isinstance(m, BlockLinear | nn.Linear)]
        formats = sorted({m.fmt.name for m in linears if isinstance(m, BlockLinear)})
        if self.quantization == "gguf":
            weight_format = "gguf:" + "+".join(formats)
        elif self.quantization in ("int4", "int8"):
            weight_format = self.quantization
        else:
            weight_format = self.dtype_name
        kernels_used = in_place(self.pool.cache)
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
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")
