"""Turns a step's sequences into one forward pass over the paged KV cache."""

from dataclasses import dataclass

import torch

from services.engine.kv_pool import KVPool
from services.engine.model import AttentionMetadata, LlamaModel


@dataclass(slots=True)
class SeqChunk:
    """New tokens of one sequence to run this step; `start_pos` tokens are already cached."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    # Logits for every token of the chunk (prompt logprobs), not only the last one.
    all_logits: bool = False

    @property
    def num_logits(self) -> int:
        return len(self.token_ids) if self.all_logits else 1


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.block_size = pool.block_size

    def forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Runs all chunks in one pass; returns [sum(num_logits), vocab] next-token logits,
        chunk by chunk: one row per chunk, or one per token for `all_logits` chunks."""
        input_ids, positions, slots, logit_indices = [], [], [], []
        bs = self.block_size
        for chunk in chunks:
            table = chunk.block_table
            for pos in range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)):
                slots.append(table[pos // bs] * bs + pos % bs)
            positions.extend(range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)))
            input_ids.extend(chunk.token_ids)
            logit_indices.extend(range(len(input_ids) - chunk.num_logits, len(input_ids)))
        meta = self._attention_metadata(chunks, slots)
        return self.model(
            self._tensor(input_ids),
            self._tensor(positions),
            self.pool.cache,
            meta,
            self._tensor(logit_indices),
        )

    def _attention_metadata(self, chunks: list[SeqChunk], slots: list[int]) -> AttentionMetadata:
        bs = self.block_size
        max_q = max(len(c.token_ids) for c in chunks)
        num_blocks = [-(-(c.start_pos + len(c.token_ids)) // bs) for c in chunks]
        max_blocks = max(num_blocks)
        # Padding entries point at block 0; the mask keeps them out of attention.
        tables = [
            c.block_table[:n] + [0] * (max_blocks - n)
            for c, n in zip(chunks, num_blocks, strict=True)
        ]
        # Query positions per padded row; padding rows attend to key 0 only (never all-masked).
        query_pos = [
            list(range(c.start_pos, c.start_pos + len(c.token_ids)))
            + [0] * (max_q - len(c.token_ids))
            for c in chunks
        ]
        key_pos = torch.arange(max_blocks * bs, device=self.device)
        mask = key_pos[None, None, :] <= self._tensor(query_pos)[:, :, None]
        query_rows = None
        if max_q > 1:
            query_rows = self._tensor(
                [i * max_q + j for i, c in enumerate(chunks) for j in range(len(c.token_ids))]
            )
        return AttentionMetadata(
            slot_mapping=self._tensor(slots),
            block_tables=self._tensor(tables),
            attn_mask=mask.unsqueeze(1),  # [num_seqs, 1, max_q, max_blocks * block_size]
            query_rows=query_rows,
            max_query_len=max_q,
        )

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
