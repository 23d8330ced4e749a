"""The paged KV cache tensor and its block manager, one per prefill or decode instance."""

import torch

from services.engine import shm_storage
from services.engine.attention import cache_shape
from services.engine.block_manager import BlockManager
from services.engine.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize


class KVPool:
    def __init__(
        self,
        config: ModelConfig,
        num_tokens: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        shared_memory: bool = False,
    ) -> None:
        """`shared_memory` (CPU only) puts the cache where decode on this host can map it."""
        num_blocks = max(1, num_tokens // block_size)
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size)
        # [num_layers, 2 (k, v), num_blocks, num_kv_heads, block_size * head_dim]: the layout
        # inside a block's head is attention's (services/engine/attention.py).
        shape = cache_shape(
            config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim
        )
        # Zeroed: masked-out slots must hold finite values, or NaN leaks through attention.
        # On the CPU the mappings read as zeros and take memory as blocks are first written.
        self.shared: shm_storage.SharedStorage | None = None
        if device.type != "cpu":
            self.cache = torch.zeros(shape, dtype=dtype, device=device)
        elif shared_memory:
            self.shared = shm_storage.create(shape, dtype)
            self.cache = self.shared.tensor
        else:
            self.cache = shm_storage.anonymous(shape, dtype)

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    def copy_block(self, source: int, target: int) -> None:
        """Copies one block's K and V, every layer, into another block."""
        self.cache[:, :, target].copy_(self.cache[:, :, source])
