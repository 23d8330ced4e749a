"""The prefill instances decode may dial for a request's KV, whatever a KV handle names."""

import asyncio
import time

from services.targets import is_loopback, parse_targets, resolve

# A configured name is resolved again on a miss, at most this often (replicas come and go).
RESOLVE_EVERY_S = 2.0
# An address stays allowed this long after a name last resolved to it: a draining instance
# leaves DNS (a headless Service lists ready pods) while its handles are still pulled.
KEEP_S = 300.0


class PrefillAllowList:
    def __init__(self, spec: str) -> None:
        """`spec`: the prefill targets (`host:port,...`, names re-resolved); empty: any
        prefill instance on this host's loopback interface, none elsewhere."""
        self._targets = parse_targets(spec) if spec else None
        self._seen: dict[str, float] = {}  # address -> when a target last resolved to it
        self._resolved_at = float("-inf")
        self._resolving: asyncio.Future[None] | None = None
        self._changed = asyncio.Condition()

    async def allows(self, address: str) -> bool:
        """On a miss, waits for the targets to be resolved again, but only until one of them
        gives `address`: a name with no instance (compose's `prefill-gpu` without the gpu
        profile) can take seconds to fail on a network with no way out. Requests arriving
        during a resolution wait for it too (a new replica's first requests come together)."""
        if self._targets is None:
            return is_loopback(address)
        if self._allowed(address):
            return True
        self._start_resolution()
        async with self._changed:
            await self._changed.wait_for(lambda: self._allowed(address) or not self._resolving)
        return self._allowed(address)

    def _allowed(self, address: str) -> bool:
        return time.monotonic() - self._seen.get(address, float("-inf")) < KEEP_S

    def _start_resolution(self) -> None:
        now = time.monotonic()
        if self._resolving is None and now - self._resolved_at >= RESOLVE_EVERY_S:
            self._resolved_at = now
            # A task of its own: a waiting request cancelled (its client gone) leaves it running.
            self._resolving = asyncio.ensure_future(self._resolve_all())

    async def _resolve_all(self) -> None:
        try:
            await asyncio.gather(*(self._resolve_one(target) for target in self._targets or []))
        finally:
            self._resolving = None
            async with self._changed:
                self._changed.notify_all()

    async def _resolve_one(self, target: tuple[str, int]) -> None:
        addresses = await resolve([target])
        now = time.monotonic()
        for address in addresses:
            self._seen[address] = now
        async with self._changed:
            self._changed.notify_all()
