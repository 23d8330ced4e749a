"""Everything a prefill or decode instance computes with: model, KV pool, runner, sampler."""

import logging
import time

from services.engine import loader
from services.engine.config import ModelConfig
from services.engine.device import choose_device, choose_dtype
from services.engine.kv_pool import KVPool
from services.engine.model import LlamaModel, build_model
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        model_spec: str,
        kv_cache_tokens: int,
        block_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        start = time.monotonic()
        self.device = choose_device(device)
        self.dtype = choose_dtype(self.device, dtype)
        self.config: ModelConfig = loader.load_config(model_spec)
        weights = loader.load_weights(model_spec, self.dtype)
        self.model: LlamaModel = build_model(self.config, weights, self.device)
        self.pool = KVPool(self.config, kv_cache_tokens, block_size, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.pool, self.device)
        self.sampler = Sampler(self.device)
        log.info(
            "loaded %s (%s, %s) with %d KV blocks in %.1fs",
            self.config.model_id,
            self.dtype,
            self.device,
            self.pool.num_blocks,
            time.monotonic() - start,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")
