"""Requests aborted at random moments leave no KV blocks, handles or sequences behind.

One prefill and one decode instance of this module's own take 1,000 requests, 16 at a time,
each cancelled at a moment drawn with a fixed seed: while queued in prefill, during its
chunked prefill, right after decode's first response (the KV transfer, over shared memory or
gRPC) or after a few decoded tokens. Prompts share cached prefixes, so aborts also drop
references to blocks other requests hold. Both pools are idle within seconds afterwards, long
before the 30 s lease of a KV handle could have freed anything.
"""

import asyncio
import collections
import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from services.grpc_server import CHANNEL_OPTIONS
from services.rpc import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.grpc_stack import ENGINE_ARGS, GREEDY, Stack, running, start_service, tokens_of

SEED = 20240611
NUM_REQUESTS, CONCURRENCY = 1000, 16
IDLE_WITHIN_S = 5.0  # the KV lease is 30 s
KINDS = ("queued", "mid_prefill", "mid_transfer", "mid_decode")
PREFIX_TOKENS = 48  # 3 blocks shared by a quarter of the prompts each


@dataclass(slots=True)
class Plan:
    kind: str
    prompt: list[int]
    delay_s: float = 0.0  # before cancelling a Prefill call
    num_responses: int = 0  # Generate responses read before cancelling


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    services = {
        "prefill": start_service(
            "prefill",
            *ENGINE_ARGS,
            *("--kv-cache-tokens", "16384", "--max-prefill-tokens", "128"),
        ),
        "decode": start_service("decode", *ENGINE_ARGS, "--kv-cache-tokens", "4096"),
    }
    with running(services):
        stack = Stack(services)
        yield stack
        stack.close()


def make_plans(rng: random.Random) -> list[Plan]:
    prefixes = [[rng.randrange(100, 40000) for _ in range(PREFIX_TOKENS)] for _ in range(4)]

    def prompt(num_tokens: int) -> list[int]:
        suffix = [rng.randrange(100, 40000) for _ in range(num_tokens - PREFIX_TOKENS)]
        return rng.choice(prefixes) + suffix

    plans = []
    for i in range(NUM_REQUESTS):
        kind = KINDS[i % len(KINDS)]
        if kind == "queued":
            plans.append(Plan(kind, prompt(rng.randint(50, 80)), delay_s=rng.uniform(0, 0.005)))
        elif kind == "mid_prefill":
            plans.append(Plan(kind, prompt(rng.randint(200, 500)), delay_s=rng.uniform(0.3, 2.5)))
        else:
            num_responses = 1 if kind == "mid_transfer" else rng.randint(2, 24)
            plans.append(Plan(kind, prompt(rng.randint(50, 90)), num_responses=num_responses))
    rng.shuffle(plans)
    return plans


async def run_plan(
    prefill: prefill_pb2_grpc.PrefillStub, decode: decode_pb2_grpc.DecodeStub, plan: Plan, i: int
) -> str:
    """Runs one request up to its abort point; returns "cancelled" or "completed"."""
    request = prefill_pb2.PrefillRequest(request_id=f"r{i}", token_ids=plan.prompt, sampling=GREEDY)
    call = prefill.Prefill(request, timeout=60)
    if plan.kind in ("queued", "mid_prefill"):
        await asyncio.sleep(plan.delay_s)
        if call.cancel():
            # As the frontend does: the answer may have been on its way, its handle pinned.
            await prefill.Abort(prefill_pb2.AbortRequest(request_id=f"r{i}"), timeout=10)
            return "cancelled"
        # Finished first: the handle is the client's, which releases it as the frontend does.
        handle_id = (await call).kv_handle.handle_id
        await prefill.Release(prefill_pb2.ReleaseRequest(handle_id=handle_id), timeout=10)
        return "completed"
    prefilled = await call
    if i % 2:
        prefilled.kv_handle.shm_path = ""  # decode pulls over gRPC instead
    stream = decode.Generate(
        decode_pb2.GenerateRequest(
            request_id=f"g{i}",
            kv_handle=prefilled.kv_handle,
            prompt_token_ids=plan.prompt,
            first_token_id=prefilled.first_token_id,
            sampling=GREEDY,
            stopping=common_pb2.Stopping(max_tokens=64, ignore_eos=True),
        ),
        timeout=60,
    )
    for _ in range(plan.num_responses):
        response = await stream.read()
        assert response is not grpc.aio.EOF and len(response.token_ids) == 1
    return "cancelled" if stream.cancel() else "completed"


async def run_storm(stack: Stack, plans: list[Plan]) -> collections.Counter:
    limit = asyncio.Semaphore(CONCURRENCY)
    prefill_address = stack.services["prefill"].address
    decode_address = stack.services["decode"].address
    async with (
        grpc.aio.insecure_channel(prefill_address, options=CHANNEL_OPTIONS) as prefill_channel,
        grpc.aio.insecure_channel(decode_address, options=CHANNEL_OPTIONS) as decode_channel,
    ):
        prefill = prefill_pb2_grpc.PrefillStub(prefill_channel)
        decode = decode_pb2_grpc.DecodeStub(decode_channel)

        async def one(i: int, plan: Plan) -> tuple[str, str]:
            async with limit:
                return plan.kind, await run_plan(prefill, decode, plan, i)

        outcomes = await asyncio.gather(*(one(i, plan) for i, plan in enumerate(plans)))
    return collections.Counter(outcomes)


def greedy(stack: Stack, prompt: list[int]) -> list[int]:
    prefilled = stack.run_prefill(prompt)
    request = decode_pb2.GenerateRequest(
        request_id="normal",
        kv_handle=prefilled.kv_handle,
        prompt_token_ids=prompt,
        first_token_id=prefilled.first_token_id,
        sampling=GREEDY,
        stopping=common_pb2.Stopping(max_tokens=8, ignore_eos=True),
    )
    return tokens_of(stack.decode.Generate(request, timeout=60))


def num_aborted_mid_compute(stack: Stack, plans: list[Plan]) -> int:
    """How many mid_prefill prompts had their first block after the shared prefix computed
    (and so cached) before their cancel: a probe of prefix + that block + 1 token hits it."""
    count = 0
    for plan in plans:
        if plan.kind != "mid_prefill":
            continue
        response = stack.run_prefill(plan.prompt[: PREFIX_TOKENS + 17])
        release = prefill_pb2.ReleaseRequest(handle_id=response.kv_handle.handle_id)
        assert stack.prefill.Release(release, timeout=10).released
        count += response.num_cached_tokens > PREFIX_TOKENS
    return count


def test_random_aborts_leave_both_pools_idle(stack):
    plans = make_plans(random.Random(SEED))
    # Shares a cached prefix with a quarter of the storm's prompts.
    normal = next(p for p in plans if p.kind == "mid_decode").prompt[:PREFIX_TOKENS] + [5, 6, 7]
    before = greedy(stack, normal)
    outcomes = asyncio.run(run_storm(stack, plans))
    assert sum(outcomes.values()) == NUM_REQUESTS
    # Every Generate was cut short; most prefills were cut while queued or computing.
    for kind in ("mid_transfer", "mid_decode"):
        assert outcomes[kind, "cancelled"] == NUM_REQUESTS // len(KINDS)
    assert outcomes["queued", "cancelled"] > NUM_REQUESTS // len(KINDS) // 2
    assert outcomes["mid_prefill", "cancelled"] > 0

    for name in ("prefill", "decode"):
        info = stack.info(name)
        stats = stack.wait_idle(name, timeout_s=IDLE_WITHIN_S)
        assert (stats.num_running, stats.num_waiting) == (0, 0), name
        assert (stats.num_used_blocks, stats.num_pinned_handles) == (0, 0), name
        assert stats.num_free_blocks == info.limits.num_kv_blocks, name  # cached count as free
    assert stack.stats("prefill").num_cached_blocks > 0
    # Some aborts landed while their prompt was being computed, not only while queued.
    assert num_aborted_mid_compute(stack, plans) > 0
    assert greedy(stack, normal) == before
    assert stack.wait_idle("decode").num_used_blocks == 0
