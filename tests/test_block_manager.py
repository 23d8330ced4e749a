"""Block manager: exact block ids, reference counts and reuse order."""

import pytest

from services.engine.block_manager import BlockManager, NoFreeBlocksError, blocks_needed


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


def test_freed_blocks_are_reused_tail_first_after_the_untouched_ones():
    manager = BlockManager(num_blocks=6, block_size=16)
    seq = manager.allocate(3)  # [0, 1, 2]
    manager.free(seq)
    # Never-used blocks 3..5 come first; then the freed sequence's tail before its head.
    assert manager.allocate(6) == [3, 4, 5, 2, 1, 0]


def test_double_free_is_caught():
    manager = BlockManager(num_blocks=2, block_size=16)
    blocks = manager.allocate(1)
    manager.free(blocks)
    with pytest.raises(AssertionError):
        manager.free(blocks)
