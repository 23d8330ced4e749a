"""Turns a step's sequences into one forward pass over the paged KV cache."""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from services.engine.attention import AttentionMetadata, in_place
from services.engine.compute_lock import ComputeLock
from services.engine.kv_pool import KVPool
from services.engine.model import LlamaModel


@dataclass(slots=True)
class SeqChunk:
    """New tokens of one sequence to run this step; `start_pos` tokens are already cached."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    # Logits for every token of the chunk (prompt logprobs), not only the last one.
    all_logits: bool = False
    # The token after the chunk is sampled (its last token's logits are wanted); False for a
    # prompt chunk that the rest of its prompt follows.
    samples: bool = True

    @property
    def num_logits(self) -> int:
        return len(self.token_ids) if self.all_logits else int(self.samples)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        pool: KVPool,
        device: torch.device,
        compute_lock: ComputeLock | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.block_size = pool.block_size
        # Passes on a CPU shared with other engine processes take turns with theirs.
        self._turns = compute_lock.held if compute_lock and device.type == "cpu" else nullcontext

    def forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Runs all chunks in one pass; returns [sum(num_logits), vocab] next-token logits,
        chunk by chunk: one row per chunk, or one per token for `all_logits` chunks."""
        input_ids, positions, slots, token_seq, logit_indices = [], [], [], [], []
        bs = self.block_size
        for i, chunk in enumerate(chunks):
            table = chunk.block_table
            chunk_positions = range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids))
            slots.extend(table[pos // bs] * bs + pos % bs for pos in chunk_positions)
            positions.extend(chunk_positions)
            token_seq.extend([i] * len(chunk.token_ids))
            input_ids.extend(chunk.token_ids)
            logit_indices.extend(range(len(input_ids) - chunk.num_logits, len(input_ids)))
        num_blocks = [-(-(c.start_pos + len(c.token_ids)) // bs) for c in chunks]
        max_blocks = max(num_blocks)
        # Padding entries point at block 0; no token attends past its own position.
        tables = [
            c.block_table[:n] + [0] * (max_blocks - n)
            for c, n in zip(chunks, num_blocks, strict=True)
        ]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            block_tables=self._tensor(tables),
            token_seq=self._tensor(token_seq),
            positions=self._tensor(positions),
        )
        if not in_place(self.pool.cache, self.model.config.head_dim):
            self._add_masks(meta, chunks, max_blocks)
        with self._turns():
            return self.model(
                self._tensor(input_ids), self.pool.cache, meta, self._tensor(logit_indices)
            )

    def _add_masks(self, meta: AttentionMetadata, chunks: list[SeqChunk], max_blocks: int) -> None:
        """What the gathering attention backend needs: a padded query layout and its mask."""
        max_q = max(len(c.token_ids) for c in chunks)
        # Query positions per padded row; padding rows attend to key 0 only (never all-masked).
        query_pos = [
            list(range(c.start_pos, c.start_pos + len(c.token_ids)))
            + [0] * (max_q - len(c.token_ids))
            for c in chunks
        ]
        key_pos = torch.arange(max_blocks * self.block_size, device=self.device)
        mask = key_pos[None, None, :] <= self._tensor(query_pos)[:, :, None]
        meta.attn_mask = mask.unsqueeze(1)  # [num_seqs, 1, max_q, max_blocks * block_size]
        meta.max_query_len = max_q
        if max_q > 1:
            meta.query_rows = self._tensor(
                [i * max_q + j for i, c in enumerate(chunks) for j in range(len(c.token_ids))]
            )

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
