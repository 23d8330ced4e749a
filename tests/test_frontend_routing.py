"""Several instances per stage: discovery, cache-aware prefill routing, least-loaded decode
routing, and routing around an instance that is down until it is back.

Unit tests drive the routers directly; the rest run the frontend over two sets of fake
stages on real gRPC."""

import asyncio
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2

from frontend.app import create_app
from frontend.config import FrontendConfig
from frontend.stages.instances import Instance, StagePool
from frontend.stages.routing import LeastLoadedRouter, PrefillRouter, PrefixIndex
from services.request_params import PromptCache
from services.targets import parse_targets, resolve
from tests.test_frontend_fake_stages import MODEL_ID, FakeStages, start_fake_stages

BLOCK = 16
COMPLETIONS = "/v1/completions"


def instance(address: str, **fields) -> Instance:
    return Instance(address, channel=None, stub=None, health=None, **fields)  # type: ignore[arg-type]


def test_parse_targets() -> None:
    assert parse_targets("a:1, b:2,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]
    for bad in ("", "a", "a:b", ":1"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_resolve() -> None:
    # IP literals as given; a name by its IPv4 addresses only; a name that does not resolve
    # has no instances (yet).
    assert asyncio.run(resolve([("127.0.0.1", 5), ("::1", 6)])) == ["127.0.0.1:5", "[::1]:6"]
    assert asyncio.run(resolve([("localhost", 7)])) == ["127.0.0.1:7"]
    assert asyncio.run(resolve([("no-such-host.invalid", 8)])) == []


def test_a_name_with_several_addresses_is_several_instances(monkeypatch) -> None:
    """As compose replicas: the name resolves to one address per replica, and replicas that
    go away are dropped on the next resolution."""
    replicas = ["10.0.0.2", "10.0.0.3"]
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "decode.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in replicas]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def discover() -> list[list[str]]:
        pool = StagePool("decode", "decode.test:50053", lambda channel: None, [], 1.0)
        seen = []
        for now in (["10.0.0.2", "10.0.0.3"], ["10.0.0.3"], []):
            replicas[:] = now
            await pool.discover()
            seen.append(sorted(pool.instances))
        await pool.close()
        return seen

    assert asyncio.run(discover()) == [
        ["10.0.0.2:50053", "10.0.0.3:50053"],
        ["10.0.0.3:50053"],
        ["10.0.0.3:50053"],  # resolving to nothing keeps the last known instances
    ]


def test_prefix_index_is_a_bounded_lru() -> None:
    index = PrefixIndex(epoch=0)
    index.add([b"a", b"b", b"c"], capacity=3)
    assert index.matched([b"a", b"b", b"x"]) == 2
    index.add([b"a"], capacity=3)  # refreshes a: b is now the oldest
    index.add([b"d"], capacity=3)
    assert index.matched([b"a"]) == 1 and index.matched([b"b"]) == 0


def test_cache_aware_prefill_follows_the_cached_prefix() -> None:
    router = PrefillRouter("cache_aware", BLOCK)
    a, b = instance("a"), instance("b")
    history = list(range(100, 164))  # 4 blocks
    hashes = router.caches.servable_hashes(history, PromptCache())
    router.caches.record(b, hashes)
    route = router.choose([a, b], len(history), hashes)
    # The last token is always computed, so 3 of the 4 blocks come from the cache.
    assert route.instance is b and route.uncached_tokens == len(history) - 3 * BLOCK
    # Another isolation key hashes differently: nothing is cached for it anywhere.
    salted = router.caches.servable_hashes(history, PromptCache("tenant"))
    assert router.choose([a, b], len(history), salted).uncached_tokens == len(history)
    # prompt_cache_max_len caps what may be served from the cache.
    capped = router.caches.servable_hashes(history, PromptCache(max_len=20))
    assert len(capped) == 1


def test_cache_aware_prefill_weighs_the_queue_against_the_cache() -> None:
    router = PrefillRouter("cache_aware", BLOCK)
    a, b = instance("a"), instance("b")
    shared = list(range(1000, 1000 + 8 * BLOCK))  # a system prompt of 8 blocks
    router.caches.record(a, router.caches.servable_hashes(shared, PromptCache()))
    prompt = [*shared, *range(5000, 5000 + BLOCK)]
    hashes = router.caches.servable_hashes(prompt, PromptCache())
    assert router.choose([a, b], len(prompt), hashes).instance is a
    # Once a has more queued than recomputing the system prompt on b costs, b is cheaper.
    a.queued_tokens = 8 * BLOCK + 1
    assert router.choose([a, b], len(prompt), hashes).instance is b


def test_new_conversations_spread_despite_a_shared_system_prompt() -> None:
    router = PrefillRouter("cache_aware", BLOCK)
    a, b = instance("a"), instance("b")
    system = list(range(2000, 2000 + 2 * BLOCK))
    placed = []
    for conversation in range(6):
        prompt = [*system, *range(10_000 * (conversation + 1), 10_000 * (conversation + 1) + 160)]
        hashes = router.caches.servable_hashes(prompt, PromptCache())
        route = router.choose([a, b], len(prompt), hashes)
        router.caches.record(route.instance, hashes)
        placed.append(route.instance.address)
    # Two cached blocks of twelve do not make a conversation: each goes where less is cached.
    assert placed.count("a") == placed.count("b") == 3


def test_round_robin_and_least_loaded() -> None:
    a, b, c = instance("a"), instance("b"), instance("c")
    router = PrefillRouter("round_robin", BLOCK)
    picks = [router.choose([a, b, c], 10, []).instance.address for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    least = LeastLoadedRouter()
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    assert least.choose([a, b, c]) is b
    b.in_flight = 2
    assert least.choose([a, b, c]) is c
    # Ties are taken in turn rather than always by the first.
    c.in_flight = 2
    assert {least.choose([a, b, c]).address for _ in range(3)} == {"a", "b", "c"}
    c.in_flight, c.reported_load = 2, 5
    assert {least.choose([a, b, c]).address for _ in range(4)} == {"a", "b"}


@pytest.fixture
def two_sets() -> Iterator[tuple[FakeStages, FakeStages]]:
    sets = (start_fake_stages(), start_fake_stages())
    yield sets
    for fakes in sets:
        fakes.stop()


def frontend(sets: tuple[FakeStages, ...], **overrides) -> TestClient:
    def targets(stage: str) -> str:
        return ",".join(fakes.addresses[stage] for fakes in sets)

    config = FrontendConfig(
        tokenizer_address=targets("tokenizer"),
        prefill_address=targets("prefill"),
        decode_address=targets("decode"),
        health_interval_s=0.1,
        **{"local_prefill_tokens": 0, **overrides},  # prefill routing is under test
    )
    return TestClient(create_app(config))


def complete(client: TestClient, prompt: str) -> dict:
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 2}
    response = client.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def served_by(sets: tuple[FakeStages, ...], stage: str, prompt: str) -> list[int]:
    """Which set's fake served each request whose prompt starts with `prompt`."""
    ids = {"\x01" + prompt}
    found = []
    for i, fakes in enumerate(sets):
        servicer = getattr(fakes, stage)
        for request in servicer.requests:
            token_ids = request.token_ids if stage == "prefill" else request.prompt_token_ids
            if "".join(map(chr, token_ids)).startswith(tuple(ids)):
                found.append(i)
    return found


def test_conversations_stay_with_their_prefill_instance(two_sets) -> None:
    with frontend(two_sets) as client:
        turns = [f"conversation {c}: tell me more. " for c in range(6)]
        for _ in range(3):  # each turn extends the last one's prompt
            for c, text in enumerate(turns):
                complete(client, text)
                turns[c] = text + "more. "
    for c in range(6):
        where = served_by(two_sets, "prefill", f"conversation {c}: ")
        assert len(where) == 3 and len(set(where)) == 1, where
    # Distinct conversations spread over both instances.
    counts = [len(s.prefill.requests) for s in two_sets]
    assert min(counts) > 0, counts


def test_round_robin_alternates(two_sets) -> None:
    with frontend(two_sets, prefill_routing="round_robin") as client:
        for turn in range(4):
            complete(client, "one conversation that goes on " + "and on " * turn)
    assert [len(s.prefill.requests) for s in two_sets] == [2, 2]


def test_distinct_prompts_spread_evenly(two_sets) -> None:
    with frontend(two_sets) as client:
        for i in range(20):
            complete(client, f"#{i:02d}: a prompt sharing no block with the others")
    for stage in ("prefill", "decode"):
        counts = [len(getattr(s, stage).requests) for s in two_sets]
        assert max(counts) <= 1.5 * min(counts), (stage, counts)


def test_a_decode_instance_that_is_down_is_skipped_until_it_is_back(two_sets) -> None:
    first, second = two_sets
    port = int(second.addresses["decode"].rsplit(":", 1)[1])
    with frontend(two_sets) as client:
        complete(client, "warm up")
        second.servers[2].stop(grace=None)  # the second set's decode goes away
        before = len(first.decode.requests)
        for i in range(6):
            complete(client, f"while it is down {i}")
        # Every request was served (one may have been retried from the dead instance).
        assert len(first.decode.requests) == before + 6
        health = client.get("/health").json()
        assert health["stages"]["decode"] == "SERVING"
        assert health["instances"]["decode"][second.addresses["decode"]] != "SERVING"
        revived = start_fake_stages(
            {"tokenizer": 0, "prefill": 0, "decode": port}
        )  # the same address again
        try:
            deadline = time.monotonic() + 10
            while (
                client.get("/health").json()["instances"]["decode"][second.addresses["decode"]]
                != "SERVING"
            ):
                assert time.monotonic() < deadline, "the revived instance was not taken back"
                time.sleep(0.1)
            for i in range(6):
                complete(client, f"after it is back {i}")
            assert len(revived.decode.requests) >= 2
        finally:
            revived.stop()


def test_a_serving_instance_goes_down_after_two_slow_health_checks_in_a_row() -> None:
    """One check that times out (a loaded host) keeps a serving instance's traffic; a second
    in a row, a refusal or NOT_SERVING take it out."""

    class Health:
        answers: list[str] = []

        async def Check(self, request, timeout):  # noqa: N802 (gRPC method name)
            answer = self.answers.pop(0)
            if answer in ("SERVING", "NOT_SERVING"):
                return health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.ServingStatus.Value(answer)
                )
            code = grpc.StatusCode[answer]
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata())

    async def healthy_after_each(answers: list[str]) -> list[bool]:
        pool = StagePool("decode", "decode.test:50053", lambda channel: None, [], 1.0)
        health = Health()
        health.answers = list(answers)
        node = Instance("decode.test:50053", channel=None, stub=None, health=health)  # type: ignore[arg-type]
        pool.instances[node.address] = node
        seen = []
        for _ in answers:
            await pool.check()
            seen.append(node.healthy)
        return seen

    slow, up = "DEADLINE_EXCEEDED", "SERVING"
    assert asyncio.run(healthy_after_each([up, slow, up, slow, slow, up])) == [
        True, True, True, True, False, True,
    ]  # fmt: skip
    assert asyncio.run(healthy_after_each([up, "UNAVAILABLE", up, "NOT_SERVING"])) == [
        True, False, True, False,
    ]  # fmt: skip
    assert asyncio.run(healthy_after_each([slow, up])) == [False, True]  # never answered yet
