"""Block manager: exact block ids, reference counts, reuse and eviction order."""

import hashlib
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.engine.block_hash import hash_block, hash_blocks, root_hash
from services.engine.block_manager import BlockManager, NoFreeBlocksError, blocks_needed


def check_invariants(manager: BlockManager) -> None:
    """Every block is exactly one of: in use, cached-evictable, never-cached free."""
    used = [b for b, ref in enumerate(manager.ref_counts) if ref > 0]
    cached = list(manager._evictable)
    free = list(manager._free)
    assert sorted(used + cached + free) == list(range(manager.num_blocks))
    assert set(cached) <= set(manager._entries) and not set(free) & set(manager._entries)
    by_block = {b: h for h, b in manager._by_hash.items()}
    assert by_block == {b: e.block_hash for b, e in manager._entries.items()}
    children = {b for siblings in manager._children.values() for b in siblings}
    assert children == {b for b, e in manager._entries.items() if e.parent is not None}
    assert manager.num_used_blocks == len(used)
    assert manager.num_cached_blocks == len(cached)
    assert manager.num_free_blocks == len(free) + len(cached)
    assert manager.num_used_blocks + manager.num_free_blocks == manager.num_blocks


def register_all(manager: BlockManager, block_ids: list[int], token_ids: list[int]) -> None:
    size = manager.block_size
    hashes = hash_blocks(token_ids, size)[: len(block_ids)]
    for i, block_hash in enumerate(hashes):
        parent = hashes[i - 1] if i else root_hash("")
        manager.register(block_ids[i], block_hash, token_ids[i * size : (i + 1) * size], parent)


def match(manager: BlockManager, token_ids: list[int], isolation_key: str = "") -> list[int]:
    return manager.match_prefix(
        hash_blocks(token_ids, manager.block_size, isolation_key), token_ids
    )


def states(manager: BlockManager) -> tuple[int, int, int]:
    """(used, cached, free) block counts, after checking the invariants."""
    check_invariants(manager)
    return manager.num_used_blocks, manager.num_cached_blocks, manager.num_free_blocks


def cached(num_blocks: int, block_size: int, *sequences: list[int]) -> BlockManager:
    """A manager whose blocks for each sequence were allocated in order, registered, freed."""
    manager = BlockManager(num_blocks, block_size)
    block_tables = [manager.allocate(len(tokens) // block_size) for tokens in sequences]
    for block_ids, tokens in zip(block_tables, sequences, strict=True):
        register_all(manager, block_ids, tokens)
        manager.free(block_ids)
    return manager


def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_allocate_hands_out_lowest_ids_first():
    manager = BlockManager(num_blocks=8, block_size=16)
    assert manager.allocate(3) == [0, 1, 2]
    assert manager.allocate(2) == [3, 4]
    assert manager.num_free_blocks == 3
    assert manager.ref_counts[:6] == [1, 1, 1, 1, 1, 0]


def test_allocate_beyond_free_raises_and_changes_nothing():
    manager = BlockManager(num_blocks=4, block_size=16)
    manager.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        manager.allocate(2)
    assert manager.num_free_blocks == 1


def test_shared_block_is_freed_only_by_its_last_holder():
    manager = BlockManager(num_blocks=4, block_size=16)
    blocks = manager.allocate(2)
    manager.share(blocks)
    assert manager.ref_counts[:2] == [2, 2]
    manager.free(blocks)
    assert manager.num_free_blocks == 2
    manager.free(blocks)
    assert manager.num_free_blocks == 4


def test_freed_blocks_are_reused_before_the_untouched_ones():
    manager = BlockManager(num_blocks=6, block_size=16)
    seq = manager.allocate(3)  # [0, 1, 2]
    manager.free(seq)
    # The blocks already written come back first (a CPU pool's untouched pages cost nothing).
    assert manager.allocate(6) == [0, 1, 2, 3, 4, 5]
    manager.free([4, 5])
    assert manager.allocate(1) == [4]  # freed tail first: the head is on top


def test_double_free_is_caught():
    manager = BlockManager(num_blocks=2, block_size=16)
    blocks = manager.allocate(1)
    manager.free(blocks)
    with pytest.raises(AssertionError):
        manager.free(blocks)


def test_hash_is_blake2b_of_little_endian_int32_and_same_in_another_process():
    packed = hashlib.blake2b(b"p\x01\x00\x00\x00\xfe\xff\xff\xff", digest_size=16).digest()
    assert hash_block(b"p", [1, -2]) == packed
    expected = b"".join(hash_blocks(list(range(100, 120)), 4, isolation_key="tenant")).hex()
    code = "from services.engine.block_hash import hash_blocks as h; " + (
        "print(b''.join(h(list(range(100, 120)), 4, isolation_key='tenant')).hex())"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        cwd = Path(__file__).resolve().parents[1]  # the repo root, so `services` imports
        run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.decode().strip() == expected


def test_salt_parent_and_ids_all_change_the_hash():
    assert root_hash("") == root_hash("") and len(root_hash("")) == 16
    assert root_hash("a") != root_hash("b") != root_hash("")
    assert hash_block(root_hash("a"), [1, 2]) != hash_block(root_hash("b"), [1, 2])
    assert hash_block(root_hash(""), [1, 2]) != hash_block(root_hash(""), [2, 1])
    assert hash_blocks([1, 2, 3, 4], 2, isolation_key="a") != hash_blocks(
        [1, 2, 3, 4], 2, isolation_key="b"
    )
    # The chain makes a block's hash depend on its whole prefix, not just its own ids.
    assert hash_blocks([1, 2, 5, 6], 2)[1] != hash_blocks([3, 4, 5, 6], 2)[1]


def test_hash_blocks_covers_only_full_blocks_within_max_tokens():
    token_ids = list(range(10))
    full = hash_blocks(token_ids, 4)
    counts = [len(hash_blocks(token_ids, 4, max_tokens=n)) for n in (100, 9, 8, 7, 3, 0)]
    assert counts == [2, 2, 2, 1, 0, 0]
    assert hash_blocks(token_ids, 4, max_tokens=7) == full[:1]
    chain = hash_blocks(list(range(16)), 4, isolation_key="s")
    assert hash_blocks(list(range(8)), 4, isolation_key="s") == chain[:2]
    assert hash_blocks(list(range(8, 16)), 4, parent=chain[1]) == chain[2:]


def test_shared_prefix_matches_registered_blocks_and_leaves_the_rest_cached():
    tokens = list(range(12))
    manager = cached(8, 4, tokens)
    assert states(manager) == (0, 3, 8)
    assert match(manager, tokens[:8] + [90, 91, 92, 93]) == [0, 1]
    assert manager.ref_counts[:3] == [1, 1, 0]
    assert states(manager) == (2, 1, 6)
    assert match(manager, tokens, isolation_key="tenant-b") == []
    assert manager.ref_counts[:3] == [1, 1, 0]
    # Counted in blocks: every block asked for is a query, every block returned a hit.
    assert (manager.num_queries, manager.num_hits) == (6, 2)


def test_hash_hit_with_different_tokens_is_a_miss():
    manager = cached(4, 2, [1, 2, 3, 4])
    hashes = hash_blocks([1, 2, 3, 4], 2)
    # As if [1, 2, 7, 7] and [8, 8, ...] collided with the registered hashes.
    assert manager.match_prefix(hashes, [1, 2, 7, 7]) == [0]
    assert manager.match_prefix(hashes, [8, 8, 3, 4]) == []
    assert manager.match_prefix(hashes, [1, 2, 3]) == [0]  # a partial block never hits
    assert manager.ref_counts == [2, 0, 0, 0]


def test_eviction_takes_free_blocks_then_lru_sequences_tail_first():
    manager = cached(8, 2, [1, 2, 3, 4], [5, 6, 7, 8, 9, 10])  # A = [0, 1], B = [2, 3, 4]
    assert manager.allocate(4) == [5, 6, 7, 1]
    assert manager.allocate(3) == [0, 4, 3]
    check_invariants(manager)
    assert match(manager, [1, 2, 3, 4]) == []
    assert match(manager, [5, 6, 7, 8, 9, 10]) == [2]  # the tail went first; the prefix hits
    assert states(manager) == (8, 0, 0) and manager.ref_counts == [1] * 8


def test_hit_leaves_the_eviction_queue_and_rejoins_at_its_end():
    manager = cached(6, 2, [1, 2, 3, 4], [5, 6, 7, 8])  # queue: 1, 0, 3, 2
    hit = match(manager, [1, 2, 3, 4])
    assert hit == [0, 1]
    assert manager.allocate(3) == [4, 5, 3]  # 1 and 0 headed the queue, but are in use
    manager.free(hit)  # queue: 2, 1, 0
    assert manager.allocate(2) == [2, 1]
    assert match(manager, [1, 2, 3, 4]) == [0]


def test_duplicate_registration_keeps_the_first_block():
    manager = BlockManager(num_blocks=4, block_size=2)
    first, second = manager.allocate(2)
    block_hash = hash_blocks([1, 2], 2)[0]
    manager.register(first, block_hash, [1, 2])
    manager.register(second, block_hash, [1, 2])
    manager.register(first, block_hash, [1, 2])  # no-op
    with pytest.raises(AssertionError):
        manager.register(first, hash_blocks([3, 4], 2)[0], [3, 4])
    manager.free([first, second])
    # Only the registered block is cached; the duplicate went back to the free list.
    assert states(manager) == (0, 1, 4)
    assert list(manager._free) == [3, 2, second]  # a stack: second is reused next
    assert match(manager, [1, 2]) == [first]


def test_reset_prefix_cache_drops_only_unreferenced_hashes():
    tokens = [1, 2, 3, 4, 5, 6]
    manager = cached(8, 2, tokens)
    assert match(manager, tokens[:2]) == [0]  # blocks 2, 1 cached; block 0 held again
    assert manager.reset_prefix_cache() == 2
    assert states(manager) == (1, 0, 7)
    assert match(manager, tokens) == [0]
    assert manager.allocate(7) == [1, 2, 3, 4, 5, 6, 7]  # the dropped blocks first


PATTERNS = [(1, 2), (3, 4), (5, 6)]  # block contents; few, so prefixes repeat and hit


@dataclass(slots=True)
class Model:
    """Reference refs and registry; exact, since allocate reports which blocks it evicts."""

    manager: BlockManager
    rng: random.Random
    refs: list[int]
    stored: dict[int, tuple[bytes, tuple[int, ...]]] = field(default_factory=dict)
    holders: list[tuple[list[int], list[int]]] = field(default_factory=list)  # ids, patterns
    queries: int = 0
    hits: int = 0
    evictions: int = 0

    def hold(self, block_ids: list[int], patterns: list[int], delta: int = 1) -> None:
        for block_id in block_ids:
            self.refs[block_id] += delta
        if delta > 0:
            self.holders.append((block_ids, patterns))

    def allocate(self) -> None:
        num = self.rng.randint(1, 4)
        if num > self.refs.count(0):
            with pytest.raises(NoFreeBlocksError):
                self.manager.allocate(num)
            return
        block_ids = self.manager.allocate(num)
        assert all(self.refs[block_id] == 0 for block_id in block_ids)
        self.evictions += sum(self.stored.pop(block_id, None) is not None for block_id in block_ids)
        self.hold(block_ids, [self.rng.randrange(3) for _ in block_ids])

    def free(self) -> None:
        if self.holders:
            block_ids, _ = self.holders.pop(self.rng.randrange(len(self.holders)))
            self.manager.free(block_ids)
            self.hold(block_ids, [], delta=-1)

    def share(self) -> None:
        if self.holders:
            block_ids, patterns = self.rng.choice(self.holders)
            self.manager.share(block_ids)
            self.hold(block_ids, patterns)

    def match(self) -> None:
        patterns = [self.rng.randrange(3) for _ in range(self.rng.randint(1, 4))]
        tokens = [t for p in patterns for t in PATTERNS[p]]
        hashes = hash_blocks(tokens, 2)
        by_hash = {block_hash: b for b, (block_hash, _) in self.stored.items()}
        expected: list[int] = []
        for block_hash, pattern in zip(hashes, patterns, strict=True):
            block_id = by_hash.get(block_hash)
            if block_id is None or self.stored[block_id][1] != PATTERNS[pattern]:
                break
            expected.append(block_id)
        assert self.manager.match_prefix(hashes, tokens) == expected
        self.queries, self.hits = self.queries + len(hashes), self.hits + len(expected)
        self.hold(expected, patterns[: len(expected)])

    def register(self) -> None:
        block_ids, patterns = self.rng.choice(self.holders) if self.holders else ([], [])
        if not block_ids:
            return
        index = self.rng.randrange(len(block_ids))
        tokens = [t for p in patterns[: index + 1] for t in PATTERNS[p]]
        block_hash = hash_blocks(tokens, 2)[-1]
        # Now and then as if another prompt's block collided with this hash.
        block_tokens = (9, 9) if self.rng.random() < 0.1 else PATTERNS[patterns[index]]
        self.manager.register(block_ids[index], block_hash, block_tokens)
        if all(block_hash != h for h, _ in self.stored.values()):
            self.stored.setdefault(block_ids[index], (block_hash, block_tokens))


def test_random_operations_keep_the_invariants():
    manager = BlockManager(num_blocks=12, block_size=2)
    model = Model(manager, random.Random(0), refs=[0] * 12)
    # Weighted so the pool neither fills up for good nor stays empty: evictions happen.
    ops = (
        [model.allocate] * 2 + [model.free] * 3 + [model.share, model.match] + [model.register] * 2
    )
    for _ in range(2000):
        model.rng.choice(ops)()
        assert manager.ref_counts == model.refs
        check_invariants(manager)
    assert (manager.num_queries, manager.num_hits) == (model.queries, model.hits)
    assert model.hits > 100 and model.evictions > 20
    for block_ids, _ in model.holders:
        manager.free(block_ids)
    assert manager.reset_prefix_cache() > 0 and states(manager) == (0, 0, 12)


def test_partial_match_finds_the_sibling_sharing_the_longest_start():
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [1, 2, 3, 4, 9, 9, 9, 9]
    c = [1, 2, 3, 4, 5, 6, 0, 0]
    manager = cached(8, 4, a, b, c)
    parent = hash_blocks(a, 4)[0]  # all three share their first block
    source, length = manager.match_partial(parent, [5, 6, 7, 1])
    assert (manager._entries[source].token_ids, length) == ((5, 6, 7, 8), 3)
    assert manager.ref_counts[source] == 1 and states(manager)[0] == 1  # referenced
    manager.free([source])
    assert manager.match_partial(parent, [9, 9])[1] == 2  # b's second block, shorter query
    manager.free([manager._by_hash[hash_blocks(b, 4)[1]]])
    assert manager.match_partial(parent, [7, 7, 7]) == (None, 0)  # no sibling starts with 7
    assert manager.match_partial(root_hash(""), [1, 2, 0, 0])[1] == 2  # first blocks too
    manager.free([manager._by_hash[hash_blocks(a, 4)[0]]])
    assert manager.match_partial(root_hash("other"), [1, 2]) == (None, 0)  # salts stay apart
    assert manager.match_partial(parent, []) == (None, 0)
    states(manager)


def test_a_partial_block_serves_partial_matches_only():
    manager = BlockManager(4, 4)
    prompt = [1, 2, 3, 4, 5, 6]  # a full block, then a prompt's last 2 tokens
    first, last = manager.allocate(2)
    parent = hash_blocks(prompt, 4)[0]
    register_all(manager, [first], prompt[:4])
    manager.register(last, hash_block(parent, prompt[4:]), prompt[4:], parent)
    with pytest.raises(AssertionError, match="no parent"):
        manager.register(last, hash_block(parent, prompt[4:]), prompt[4:])
    manager.free([first, last])
    assert states(manager) == (0, 2, 4)
    # Never a whole block: a prompt with more tokens after it matches its 2 tokens only.
    assert manager.match_prefix(hash_blocks([*prompt, 7, 8], 4), [*prompt, 7, 8]) == [first]
    assert manager.match_partial(parent, [5, 6, 7, 8]) == (last, 2)
    assert manager.match_partial(parent, [5, 9]) == (last, 1)
    manager.free([first, last, last])
    assert manager.allocate(4) and manager.match_partial(parent, [5, 6]) == (None, 0)
    assert manager._children == {}


def test_partial_candidates_leave_with_their_hash():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    manager = cached(2, 4, tokens)
    parent = hash_blocks(tokens, 4)[0]
    assert manager.allocate(2)  # evicts both cached blocks
    assert manager.match_partial(parent, [5, 6]) == (None, 0)
    assert manager._children == {}
    manager = cached(2, 4, tokens)
    manager.reset_prefix_cache()
    assert manager.match_partial(parent, [5, 6]) == (None, 0) and manager._children == {}
