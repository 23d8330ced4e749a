"""Which instance serves a request.

Prefill (`cache_aware`, the default) first finds the longest prefix of the prompt that any
healthy instance is believed to hold in its prefix cache.

- When that covers at least half the prompt (a conversation's next turn), it estimates for
  each instance the prompt tokens it would have to compute: the prompt minus the prefix that
  instance holds, plus the uncached tokens of the requests this frontend already has queued
  there. The least work wins, so a conversation returns to the instance that holds its
  history, and a long prefix every request shares pulls traffic to one instance only until
  that instance's queue costs more than recomputing the prefix elsewhere.
- Otherwise the prompt is mostly new (a new conversation; a short shared system prompt does
  not count), and it goes to the instance with the fewest queued tokens, ties taken in turn:
  new conversations spread over the instances, and each instance's cache holds its share of
  the histories rather than a copy of all of them.

`round_robin` takes the instances in turn.

Decode goes to the instance with the fewest requests open from this frontend, then the
fewest running and waiting sequences it reported last.

The frontend knows what each prefill instance caches from what it sent there: the prompt's
chained block hashes (the same `services.engine.block_hash` chain the prefill cache keys
blocks by), kept per instance in an LRU as large as the instance's KV pool. It is an
estimate: the instance may have evicted sooner, or other frontends may have filled it.
"""

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from frontend.stages.instances import Instance
from services.request_params import PromptCache

PREFILL_POLICIES = ("cache_aware", "round_robin")
# A prompt whose best cached prefix covers less than this share of it is placed as new.
_STICKY_SHARE = 0.5
# Used until an instance reports its pool size.
_DEFAULT_INDEX_BLOCKS = 4096


@dataclass(slots=True)
class Route:
    """A chosen prefill instance and the prompt tokens it is expected to compute there."""

    instance: Instance
    uncached_tokens: int


class PrefixIndex:
    """The block hashes believed cached on one instance, least recently used first."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # the instance's epoch it describes: a restart empties the cache
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def matched(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the chain are held."""
        count = 0
        for block_hash in hashes:
            if block_hash not in self._blocks:
                break
            count += 1
        return count

    def add(self, hashes: Sequence[bytes], capacity: int) -> None:
        for block_hash in hashes:
            self._blocks[block_hash] = None
            self._blocks.move_to_end(block_hash)
        while len(self._blocks) > capacity:
            self._blocks.popitem(last=False)


def _rotated(instances: Sequence[Instance], turn: int) -> list[Instance]:
    """Ties go to the first in order; rotating the order spreads them."""
    start = turn % len(instances)
    return [*instances[start:], *instances[:start]]


class CacheIndexes:
    """What each instance of one stage is believed to hold in its prefix cache: the chains
    this frontend sent there."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._indexes: dict[str, PrefixIndex] = {}

    def servable_hashes(self, token_ids: Sequence[int], prompt_cache: PromptCache) -> list[bytes]:
        """The hash chain of the blocks a stage may serve from its cache (the stages' own
        chain, `PromptCache.block_hashes`, up to `PromptCache.servable_tokens`)."""
        servable = prompt_cache.servable_tokens(len(token_ids))
        return prompt_cache.block_hashes(token_ids[:servable], self.block_size)

    def cached_tokens(self, instance: Instance, hashes: Sequence[bytes]) -> int:
        """Leading prompt tokens `instance` is believed to hold."""
        return self.block_size * self._index(instance).matched(hashes)

    def record(self, instance: Instance, hashes: Sequence[bytes]) -> None:
        """`instance` now holds these blocks (called once it has them or computes them)."""
        capacity = instance.num_kv_blocks or _DEFAULT_INDEX_BLOCKS
        self._index(instance).add(hashes, capacity)

    def _index(self, instance: Instance) -> PrefixIndex:
        index = self._indexes.get(instance.address)
        if index is None or index.epoch != instance.epoch:
            index = self._indexes[instance.address] = PrefixIndex(instance.epoch)
        return index


class PrefillRouter:
    def __init__(self, policy: str, block_size: int) -> None:
        if policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill routing {policy!r} is not one of {PREFILL_POLICIES}")
        self.policy = policy
        self.caches = CacheIndexes(block_size)
        self._turn = itertools.count()

    def choose(
        self, instances: Sequence[Instance], num_tokens: int, hashes: Sequence[bytes]
    ) -> Route:
        """The instance for a prompt of `num_tokens` whose cacheable blocks are `hashes`."""

        ordered = _rotated(instances, next(self._turn))
        cached = {i.address: self.caches.cached_tokens(i, hashes) for i in ordered}

        def uncached(instance: Instance) -> int:
            return num_tokens - cached[instance.address]

        if self.policy == "round_robin":
            best = ordered[0]
        elif max(cached.values()) >= _STICKY_SHARE * num_tokens:
            best = min(
                ordered,
                key=lambda i: (uncached(i) + i.queued_tokens, i.in_flight, i.reported_load),
            )
        else:
            best = min(ordered, key=lambda i: (i.queued_tokens, i.in_flight, i.reported_load))
        return Route(best, uncached(best))


class LeastLoadedRouter:
    """Decode and the tokenizer: the fewest requests open from here, then the fewest running
    and waiting that the instance reported."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, instances: Sequence[Instance]) -> Instance:
        ordered = _rotated(instances, next(self._turn))
        return min(ordered, key=lambda i: (i.in_flight, i.reported_load))
