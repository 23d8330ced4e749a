"""Decode dials only the prefill instances it was told of."""

import asyncio

from services.decode.prefill_allowlist import PrefillAllowList


def allowed(spec: str, *addresses: str) -> list[bool]:
    allow_list = PrefillAllowList(spec)

    async def check() -> list[bool]:
        return [await allow_list.allows(address) for address in addresses]

    return asyncio.run(check())


def test_unconfigured_allows_loopback_only():
    checks = allowed("", "127.0.0.1:50052", "[::1]:50052", "localhost:1", "10.0.0.7:50052")
    assert checks == [True, True, True, False]


def test_configured_targets_allow_what_they_name():
    checks = allowed("localhost:50052,10.0.0.7:50052", "127.0.0.1:50052", "10.0.0.7:50052")
    assert checks == [True, True]
    # Another port of an allowed host, or any other host, is not an instance it knows.
    assert allowed("10.0.0.7:50052", "10.0.0.7:50053", "127.0.0.1:50052") == [False, False]


def test_concurrent_first_requests_wait_for_one_resolution(monkeypatch):
    """A new decode replica's first requests arrive together: every one of them is allowed once
    the single resolution they share finishes."""
    calls = []

    async def slow_resolve(targets):
        calls.append(targets)
        await asyncio.sleep(0.05)
        return ["10.0.0.7:50052"]

    monkeypatch.setattr("services.decode.prefill_allowlist.resolve", slow_resolve)
    allow_list = PrefillAllowList("prefill:50052")

    async def check() -> list[bool]:
        return await asyncio.gather(*(allow_list.allows("10.0.0.7:50052") for _ in range(8)))

    assert asyncio.run(check()) == [True] * 8
    assert len(calls) == 1


def test_a_name_that_does_not_resolve_does_not_hold_up_one_that_does(monkeypatch):
    """Compose's decode names `prefill-gpu` too; without the gpu profile no container has that
    name, and on a network with no way out its lookup fails only after seconds."""

    async def resolve(targets):
        ((host, port),) = targets
        if host == "prefill-gpu":
            await asyncio.sleep(30)
            return []
        return [f"10.0.0.7:{port}"]

    monkeypatch.setattr("services.decode.prefill_allowlist.resolve", resolve)
    allow_list = PrefillAllowList("prefill:50052,prefill-gpu:50052")

    async def check() -> bool:
        return await asyncio.wait_for(allow_list.allows("10.0.0.7:50052"), timeout=5)

    assert asyncio.run(check())
