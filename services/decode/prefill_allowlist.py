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

    async def allows(self, address: str) -> bool:
        if self._targets is None:
            return is_loopback(address)
        if not self._allowed(address):
            await self._refresh()
        return self._allowed(address)

    def _allowed(self, address: str) -> bool:
        return time.monotonic() - self._seen.get(address, float("-inf")) < KEEP_S

    async def _refresh(self) -> None:
        """Resolves the targets again unless that was done in the last RESOLVE_EVERY_S. A caller
        arriving while a resolution runs waits for it: a new decode replica's first requests
        come together, and all but the first would otherwise be refused."""
        if self._resolving is None:
            if time.monotonic() - self._resolved_at < RESOLVE_EVERY_S:
                return
            self._resolved_at = time.monotonic()
            self._resolving = asyncio.ensure_future(self._resolve())
        # shield: a caller cancelled (its client gone) does not cancel the others' resolution.
        await asyncio.shield(self._resolving)

    async def _resolve(self) -> None:
        try:
            addresses = await resolve(self._targets)
            now = time.monotonic()
            for address in addresses:
                self._seen[address] = now
        finally:
            self._resolving = None
