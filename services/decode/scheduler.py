"""Continuous batching: which sequences run in the next step (pure Python, no torch).

Sequences join and leave at step boundaries. Each step gives every running sequence its
uncached tokens (one in steady decode; more after a preemption, or for a prompt decode
computes itself, whose last chunk samples the first token). Those longer runs are computed
in chunks: a step's tokens stay under its token budget, and its prompt tokens (all runs
longer than one token) under the chunk budget, so a long prompt delays the running
sequences' next tokens by about one chunk a step, not by all of it. A sequence in steady
decode with a drafter also gets its draft tokens, verified in the same step; the blocks they
need come only from free ones. When the pool runs dry, blocks are taken back from waiting
sequences first (newest first), then by preempting the newest running one: its blocks are
freed and it is recomputed later, from what the prefix cache still holds, never failed.

A new sequence's prompt KV is pulled only once it can join the batch (`begin_pull`): the
running, waiting and pulling sequences together stay within max_batch_size, so waiting
sequences hold little, and what they hold is given up before the batch starves. Every
sequence fits the pool alone (decode refuses the rest), so the oldest always progresses.
"""

import time
from collections import deque
from dataclasses import dataclass, field

from services.decode.sequence import Finish, Sequence
from services.engine.block_hash import hash_block
from services.engine.block_manager import BlockManager, blocks_needed


@dataclass(slots=True)
class Scheduled:
    seq: Sequence
    num_tokens: int  # uncached tokens computed this step (drafts not counted)
    draft: list[int] = field(default_factory=list)  # draft tokens verified after them

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new one is sampled."""
        return self.seq.num_cached + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch_size: int,
        max_step_tokens: int,
        max_chunk_tokens: int | None = None,
    ) -> None:
        """`max_chunk_tokens`: the prompt tokens one step computes (None: the step budget)."""
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.max_chunk_tokens = max_step_tokens if max_chunk_tokens is None else max_chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_pulling = 0  # sequences between begin_pull and end_pull
        # (source, target) block copies that scheduled sequences need before their step
        # (partial prefix-cache hits); the engine makes them, then frees each source.
        self.copies: list[tuple[int, int]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def begin_pull(
        self, block_hashes: list[bytes], prompt_ids: list[int], num_blocks: int
    ) -> tuple[list[int], list[int]] | None:
        """Blocks for a new sequence's prompt KV, once it can join the batch: those its prefix
        cache holds (leading blocks of `block_hashes`), then newly allocated ones for the rest.
        None: not now (no batch slot, or too few free blocks); nothing is held then."""
        if len(self.running) + len(self.waiting) + self.num_pulling >= self.max_batch_size:
            return None
        if not self.blocks.can_allocate(num_blocks - len(block_hashes)):
            return None  # too few free blocks even if every hashed block were cached
        reused = self.blocks.match_prefix(block_hashes, prompt_ids)
        missing = num_blocks - len(reused)
        if not self.blocks.can_allocate(missing):
            self.blocks.free(reused)
            return None
        self.num_pulling += 1
        return reused, self.blocks.allocate(missing)

    def end_pull(self, seq: Sequence | None) -> None:
        """The pull that `begin_pull` started is over: `seq` waits to join, or (None) the pull
        failed and its blocks were freed."""
        self.num_pulling -= 1
        if seq is not None:
            self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._release(seq, Finish.ABORT)
                    return seq
        return None

    def schedule(self) -> list[Scheduled]:
        budget, chunk_budget = self.max_step_tokens, self.max_chunk_tokens
        scheduled: list[Scheduled] = []
        kept: deque[Sequence] = deque()
        while self.running:
            seq = self.running.popleft()
            if not self._reserve(seq, preempt_running=True):
                self._preempt(seq)
                continue
            num_tokens = min(len(seq.token_ids) - seq.num_cached, max(budget, 1))
            if num_tokens > 1:  # a chunk of a prompt: at least one token, so it progresses
                num_tokens = min(num_tokens, max(chunk_budget, 1))
                chunk_budget -= num_tokens
            budget -= num_tokens
            draft = self._draft(seq, num_tokens, budget)
            budget -= len(draft)
            scheduled.append(Scheduled(seq, num_tokens, draft))
            kept.append(seq)
        self.running = kept
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            if not self._reserve(seq, preempt_running=False):
                break
            num_tokens = min(len(seq.token_ids) - seq.num_cached, budget)
            if num_tokens > 1:
                if chunk_budget <= 0:
                    break  # joins at a later step, with the blocks it now holds
                num_tokens = min(num_tokens, chunk_budget)
                chunk_budget -= num_tokens
            self.waiting.popleft()
            budget -= num_tokens
            draft = self._draft(seq, num_tokens, budget)
            budget -= len(draft)
            seq.joined_ns = seq.joined_ns or time.monotonic_ns()
            scheduled.append(Scheduled(seq, num_tokens, draft))
            self.running.append(seq)
        return scheduled

    def postprocess(self, scheduled: list[Scheduled], sampled: list[list[int]]) -> list[tuple]:
        """Applies a step's results. `sampled` has, per entry that `samples`, its new tokens:
        the drafts it accepted, then one sampled token.

        Returns (seq, token_id, finish) for each new token, in order; a sequence's tokens end
        at the first that finishes it.
        """
        outputs = []
        new_tokens = iter(sampled)
        for item in scheduled:
            seq = item.seq
            if not item.samples:
                seq.num_cached += item.num_tokens
                self._cache_full_blocks(seq)
                continue
            finish = None
            if seq.num_generated == 0:
                seq.first_token_ns = time.monotonic_ns()
            for token_id in next(new_tokens):
                seq.token_ids.append(token_id)
                finish = seq.stop.check(token_id, seq.num_generated, len(seq.token_ids))
                outputs.append((seq, token_id, finish))
                if finish is not None:
                    break
            # KV is valid for the step's tokens and the accepted drafts: all but the last.
            seq.num_cached = len(seq.token_ids) - 1
            if finish is not None:
                self.running.remove(seq)
                self._release(seq, finish)
                continue
            self._cache_full_blocks(seq)
            # Blocks reserved for rejected drafts go back.
            needed = blocks_needed(len(seq.token_ids), self.blocks.block_size)
            self.blocks.free(seq.block_table[needed:])
            del seq.block_table[needed:]
        return outputs

    def _draft(self, seq: Sequence, num_tokens: int, budget: int) -> list[int]:
        """Drafts to verify after a steady-decode sequence's token: within the token budget,
        max_tokens, the context window and the blocks already free (never preempting). A
        prompt decode computes itself gets none before its first token."""
        if seq.drafter is None or num_tokens != 1 or len(seq.token_ids) - seq.num_cached != 1:
            return []
        if seq.num_generated == 0:
            return []
        num_tokens_now = len(seq.token_ids)
        limit = min(budget, seq.tokens_left - 1)
        if seq.closer is not None:
            limit = min(limit, seq.closer.free_tokens(seq.tokens_left))
        if limit <= 0:
            return []
        draft = seq.drafter.propose(seq.token_ids, limit)
        size = self.blocks.block_size
        room = len(seq.block_table) * size + self.blocks.num_free_blocks * size - num_tokens_now
        draft = draft[: max(room, 0)]
        missing = blocks_needed(num_tokens_now + len(draft), size) - len(seq.block_table)
        if missing > 0:
            seq.block_table.extend(self.blocks.allocate(missing))
        return draft

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Offers each block the sequence has filled since the last call to the prefix cache:
        prompt blocks, whose hashes came with the request, once computed here (pulled ones are
        already offered), then generated ones, whose hashes extend the chain."""
        hashes, size = seq.block_hashes, self.blocks.block_size
        num_full = seq.num_cached // size
        while seq.extends_chain and len(hashes) < num_full:
            i = len(hashes)
            hashes.append(hash_block(_parent(seq, i), seq.token_ids[i * size : (i + 1) * size]))
        num_full = min(num_full, len(hashes))
        for i in range(seq.num_offered_blocks, num_full):
            tokens = seq.token_ids[i * size : (i + 1) * size]
            self.blocks.register(seq.block_table[i], hashes[i], tokens, _parent(seq, i))
        seq.num_offered_blocks = max(seq.num_offered_blocks, num_full)

    def _offer_last_block(self, seq: Sequence) -> None:
        """Offers an ending sequence's last, partly filled block to partial matches (never to
        whole-block ones): its tokens no longer change, and a later prompt that starts the
        same way copies their KV (`_reserve`) instead of computing them."""
        size = self.blocks.block_size
        last = seq.num_cached // size
        tokens = seq.token_ids[last * size : seq.num_cached]
        if seq.extends_chain and tokens and len(seq.block_hashes) == last:
            parent = _parent(seq, last)
            self.blocks.register(seq.block_table[last], hash_block(parent, tokens), tokens, parent)

    def _reserve(self, seq: Sequence, preempt_running: bool) -> bool:
        """Allocates blocks for all of `seq`'s tokens, taking them from waiting sequences
        (and, with `preempt_running`, from the newest running ones still to be scheduled)."""
        partial = self._reuse_cached(seq) if not seq.block_table else None
        missing = blocks_needed(len(seq.token_ids), self.blocks.block_size) - len(seq.block_table)
        while not self.blocks.can_allocate(missing):
            holders = [s for s in self.waiting if s.block_table and s is not seq]
            if holders:
                self._evict(holders[-1])
            elif preempt_running and self.running:
                self._preempt(self.running.pop())
            else:
                if partial is not None:
                    self.blocks.free([partial[0]])
                return False
        if missing > 0:
            seq.block_table.extend(self.blocks.allocate(missing))
        if partial is not None:
            source, length = partial
            self.copies.append((source, seq.block_table[seq.num_cached // self.blocks.block_size]))
            seq.num_cached += length
        return True

    def _reuse_cached(self, seq: Sequence) -> tuple[int, int] | None:
        """A sequence without blocks (new, preempted, or given them up while waiting) takes
        back the leading blocks its prefix cache chain still finds, then looks for a cached
        block after them that starts with its next tokens: (that block, referenced, and how
        many of its tokens serve), to copy once its own blocks are allocated. The last token
        is always computed."""
        size = self.blocks.block_size
        servable = seq.prompt_cache.servable_tokens(len(seq.token_ids))
        hits = self.blocks.match_prefix(seq.block_hashes[: servable // size], seq.token_ids)
        seq.block_table, seq.num_cached = hits, len(hits) * size
        if seq.computes_prompt and not seq.joined_ns:
            seq.num_reused_tokens = seq.num_cached
        start = seq.num_cached
        source, length = self.blocks.match_partial(
            _parent(seq, len(hits)), seq.token_ids[start : min(start + size, servable)]
        )
        if source is None:
            return None
        if seq.computes_prompt and not seq.joined_ns:
            seq.num_reused_tokens += length
        return source, length

    def _preempt(self, seq: Sequence) -> None:
        """Takes a running sequence out of the batch; it waits at the front of the queue."""
        self._evict(seq)
        self.waiting.appendleft(seq)

    def _evict(self, seq: Sequence) -> None:
        """Frees a sequence's blocks; they stay in the prefix cache until reused."""
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0
        seq.num_offered_blocks = 0
        self.num_preemptions += 1

    def _release(self, seq: Sequence, finish: Finish) -> None:
        self._cache_full_blocks(seq)
        self._offer_last_block(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.finish = finish


def _parent(seq: Sequence, index: int) -> bytes:
    """The hash that block `index` of the sequence's chain extends."""
    return seq.block_hashes[index - 1] if index else seq.prompt_cache.root_hash()
