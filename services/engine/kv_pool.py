"""The paged KV cache tensor and its block manager, one per prefill or decode instance."""

import torch

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
    ) -> None:
        num_blocks = max(1, num_tokens // block_size)
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size)
        # Zeroed: masked-out slots must hold finite values, or NaN leaks through attention.
        # [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]
        self.cache = torch.zeros(
            config.num_layers,
            2,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks
