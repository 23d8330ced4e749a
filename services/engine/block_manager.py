"""Paged KV block bookkeeping with a prefix cache: pure Python, no torch, so it is tested
without a model.

Every block is in exactly one of three states:
- in use: `ref_counts[b] > 0`; it may also hold a registered hash;
- cached: ref 0 but still holding a registered hash, waiting in the LRU eviction queue;
- never-cached free: ref 0, no hash, in the free list.
Cached blocks count as free: `allocate` evicts them lazily, only once the free list is
empty, so their KV stays reusable for as long as nobody needs the memory.
"""

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    pass


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(slots=True)
class _CacheEntry:
    block_hash: bytes
    token_ids: tuple[int, ...]  # exactly block_size ids, compared on every hit
    parent: bytes | None  # the previous block's hash (or the root), when the caller gave it


class BlockManager:
    """Hands out fixed-size KV blocks with reference counts and a prefix cache.

    `n > 1` forks and pinned handles share blocks by holding references. Callers that
    never `register` blocks see the plain allocator: no block ever becomes cached.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.num_queries = 0  # blocks asked for by match_prefix
        self.num_hits = 0  # blocks match_prefix returned
        # A stack, the most recently freed block on top, then untouched blocks lowest id
        # first: work reuses the blocks it has written, and a CPU pool's pages take memory
        # only once written (services/engine/shm_storage.py).
        self._free: deque[int] = deque(range(num_blocks - 1, -1, -1))
        # Cached ref-0 blocks, least recently freed first: the eviction order.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Invariant: _by_hash[h] == b  <=>  _entries[b].block_hash == h.
        self._entries: dict[int, _CacheEntry] = {}
        self._by_hash: dict[bytes, int] = {}
        # Registered blocks by their parent's hash and first token, for match_partial.
        self._children: dict[tuple[bytes, int], set[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out now, evictable cached ones included."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks still holding a hash (each one evictable)."""
        return len(self._evictable)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks with ref 1: never-cached ones first, then the LRU cached ones."""
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {num_blocks} blocks, {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.pop()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._forget(block_id)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0, f"block {block_id} is free"
            self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        # Tail first: a sequence's last blocks are reused (or evicted) before its prefix,
        # which is the part other requests are most likely to share.
        for block_id in reversed(block_ids):
            assert self.ref_counts[block_id] > 0, f"block {block_id} freed twice"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if block_id in self._entries:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    def match_prefix(self, block_hashes: Sequence[bytes], token_ids: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached run of leading `block_hashes`, each referenced.

        `token_ids` are the tokens the hashes were computed from; a hit also needs the
        stored ids to equal them, so a hash collision can never serve another prompt's KV.
        Stops at the first miss: a later block is useless without its prefix.
        """
        block_ids: list[int] = []
        for index, block_hash in enumerate(block_hashes):
            block_id = self._by_hash.get(block_hash)
            if block_id is None:
                break
            start = index * self.block_size
            if self._entries[block_id].token_ids != tuple(
                token_ids[start : start + self.block_size]
            ):
                break
            block_ids.append(block_id)
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self.ref_counts[block_id] += 1
        self.num_queries += len(block_hashes)
        self.num_hits += len(block_ids)
        return block_ids

    def match_partial(self, parent: bytes, token_ids: Sequence[int]) -> tuple[int | None, int]:
        """The cached block after `parent` whose tokens share the longest run of leading
        `token_ids` (at least one; the lowest block id among equals), referenced, and that
        run's length; (None, 0) when none shares any. Only blocks registered with their
        parent are candidates. The caller copies the run's KV and frees the block."""
        if not token_ids:
            return None, 0
        best, best_length = None, 0
        for block_id in sorted(self._children.get((parent, token_ids[0]), ())):
            cached = self._entries[block_id].token_ids
            length = 0
            for ours, theirs in zip(token_ids, cached, strict=False):
                if ours != theirs:
                    break
                length += 1
            if length > best_length:
                best, best_length = block_id, length
        if best is not None:
            if self.ref_counts[best] == 0:
                del self._evictable[best]
            self.ref_counts[best] += 1
        return best, best_length

    def register(
        self,
        block_id: int,
        block_hash: bytes,
        token_ids: Sequence[int],
        parent: bytes | None = None,
    ) -> None:
        """Offers an in-use, computed block to later `match_prefix` calls, and with its
        `parent` hash to `match_partial` calls. A block that is not full (a prompt's last
        tokens) is offered to `match_partial` alone, so it needs its parent; its tokens must
        never change while it is registered.

        The first block registered under a hash keeps it; a later duplicate stays
        unregistered and is simply freed into the free list when released.
        """
        assert self.ref_counts[block_id] > 0, f"block {block_id} is free"
        assert 0 < len(token_ids) <= self.block_size, f"block {block_id}: {len(token_ids)} ids"
        assert len(token_ids) == self.block_size or parent is not None, (
            f"block {block_id} is not full and has no parent"
        )
        entry = self._entries.get(block_id)
        if entry is not None:
            # A block's tokens never change while it is allocated, so neither may its hash.
            assert entry.block_hash == block_hash, f"block {block_id} registered twice"
            return
        if block_hash in self._by_hash:
            return
        self._entries[block_id] = _CacheEntry(block_hash, tuple(token_ids), parent)
        self._by_hash[block_hash] = block_id
        if parent is not None:
            self._children.setdefault((parent, token_ids[0]), set()).add(block_id)

    def reset_prefix_cache(self) -> int:
        """Drops the hashes of all unreferenced blocks; returns how many were dropped.

        Referenced blocks keep theirs: their owners may still rely on them being shared.
        """
        num_dropped = len(self._evictable)
        for block_id in self._evictable:
            self._forget(block_id)
            self._free.append(block_id)
        self._evictable.clear()
        return num_dropped

    def _forget(self, block_id: int) -> None:
        entry = self._entries.pop(block_id)
        del self._by_hash[entry.block_hash]
        if entry.parent is not None:
            key = (entry.parent, entry.token_ids[0])
            self._children[key].discard(block_id)
            if not self._children[key]:
                del self._children[key]
