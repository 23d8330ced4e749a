"""Chained content hashes of full KV blocks, the keys of the prefix cache.

Prefill and decode run in different processes, possibly on different hosts, and must
compute the same key for the same tokens, so the hash is blake2b over explicit
little-endian int32 bytes; Python's `hash()` is salted per process and never used here.

A block's hash covers its parent's hash, so equal hashes imply (up to collisions, which
`BlockManager.match_prefix` guards against with a token comparison) an equal prefix
from the first token, not just an equal block.
"""

import hashlib
import struct
from collections.abc import Sequence

DIGEST_SIZE = 16
# Domain separation: a root's input (tag + key) can never equal a block's (parent + ids).
_ROOT_TAG = b"kv-prefix-root\x00"


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of one block whose prefix hashes to `parent`."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    digest.update(parent)
    digest.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return digest.digest()


def root_hash(isolation_key: str) -> bytes:
    """The chain's root, salted by the prompt-cache isolation key ("" when none).

    Different keys give different roots, so their chains never meet and requests with
    different isolation keys never share cache entries.
    """
    seed = _ROOT_TAG + isolation_key.encode("utf-8")
    return hashlib.blake2b(seed, digest_size=DIGEST_SIZE).digest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    isolation_key: str = "",
    max_tokens: int | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Chained hashes of each full block of `token_ids`.

    Only blocks lying entirely within the first `max_tokens` tokens are hashed (None: no
    cap; 0: none), so a caller that must compute the last prompt token itself passes
    `len(prompt) - 1`. `parent` continues an existing chain, `token_ids` then starting at
    a block boundary; `isolation_key` only picks the root when `parent` is None.
    """
    num_tokens = len(token_ids) if max_tokens is None else min(len(token_ids), max_tokens)
    num_full_blocks = max(num_tokens, 0) // block_size
    block_hash = root_hash(isolation_key) if parent is None else parent
    hashes = []
    for start in range(0, num_full_blocks * block_size, block_size):
        block_hash = hash_block(block_hash, token_ids[start : start + block_size])
        hashes.append(block_hash)
    return hashes
