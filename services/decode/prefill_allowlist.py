"""The prefill instances decode may dial for a request's KV, whatever a KV handle names."""

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

    async def allows(self, address: str) -> bool:
        if self._targets is None:
            return is_loopback(address)
        now = time.monotonic()
        if now - self._seen.get(address, float("-inf")) >= KEEP_S:
            if now - self._resolved_at >= RESOLVE_EVERY_S:
                self._resolved_at = now
                for resolved in await resolve(self._targets):
                    self._seen[resolved] = now
        return now - self._seen.get(address, float("-inf")) < KEEP_S
