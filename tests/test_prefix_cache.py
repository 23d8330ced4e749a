"""Prefix caching, chunked prefill and the KV handoff over real gRPC, default model on CPU.

Uses the session services plus instances of its own: a prefill with a 32-token budget per
forward pass, a prefill whose pool is not in shared memory, and a decode with a 16-block pool.
Every prompt starts with a tag of its own, so no other test's cache entries can serve it.
"""

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.engine.tokenizer import Tokenizer
from services.rpc import common_pb2, decode_pb2, prefill_pb2
from tests.engine_reference import Reference
from tests.grpc_stack import (
    ENGINE_ARGS,
    GREEDY,
    Stack,
    rpc_error,
    running,
    start_service,
    tokens_of,
)

pytest_plugins = ["tests.grpc_fixtures"]

FILLER = " ".join(f"Item {i} is {i * i}." for i in range(400))  # about 5,000 tokens
TINY_POOL_TOKENS = 256  # decode_tiny: 16 blocks


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    kv = ("--kv-cache-tokens", "2048")
    extra = {
        "prefill_chunked": start_service(
            "prefill", *ENGINE_ARGS, *kv, "--max-prefill-tokens", "32"
        ),
        "prefill_grpc": start_service("prefill", *ENGINE_ARGS, *kv, "--no-shared-kv"),
        "decode_tiny": start_service(
            "decode", *ENGINE_ARGS, "--kv-cache-tokens", str(TINY_POOL_TOKENS)
        ),
    }
    session: Stack = request.getfixturevalue("services_stack")  # starts while these load
    with running(extra):
        stack = Stack({**session.services, **extra})
        yield stack
        stack.close()


@pytest.fixture(scope="module")
def tok(default_tokenizer: Tokenizer) -> Tokenizer:
    return default_tokenizer


@pytest.fixture(scope="module")
def reference(engine_reference: Reference) -> Reference:
    return engine_reference


def text_prompt(tok: Tokenizer, tag: str, num_tokens: int) -> list[int]:
    ids = tok.encode(f"{tag}. {FILLER}")[:num_tokens]
    assert len(ids) == num_tokens
    return ids


def generate(
    stack: Stack, prompt: list[int], max_tokens: int, decode: str = "decode", **prefill_args
) -> tuple[prefill_pb2.PrefillResponse, list[decode_pb2.GenerateResponse]]:
    """Greedy: prefill (prefill_args: `prefill`, `isolation_key`, ...), then decode to the end."""
    ignore_eos = prefill_args.pop("ignore_eos", False)
    prefilled = stack.run_prefill(prompt, **prefill_args)
    cache = {k: v for k, v in prefill_args.items() if k in ("isolation_key", "max_len")}
    request = generate_request(prompt, prefilled, max_tokens, ignore_eos)
    request.prompt_cache.CopyFrom(common_pb2.PromptCache(**cache))  # as the frontend sends it
    return prefilled, list(stack.decode_stub(decode).Generate(request, timeout=120))


def generate_request(
    prompt: list[int], prefilled: prefill_pb2.PrefillResponse, max_tokens: int, ignore_eos=False
) -> decode_pb2.GenerateRequest:
    return decode_pb2.GenerateRequest(
        request_id=f"g-{prefilled.kv_handle.handle_id}",
        kv_handle=prefilled.kv_handle,
        prompt_token_ids=prompt,
        first_token_id=prefilled.first_token_id,
        sampling=GREEDY,
        stopping=common_pb2.Stopping(max_tokens=max_tokens, ignore_eos=ignore_eos),
    )


def cached_tokens(stack: Stack, prompt: list[int], prefill: str = "prefill", **cache) -> int:
    """Prefills `prompt`, releases its handle and returns how many tokens were cache hits."""
    response = stack.run_prefill(prompt, prefill=prefill, **cache)
    release = prefill_pb2.ReleaseRequest(handle_id=response.kv_handle.handle_id)
    assert stack.prefill_stub(prefill).Release(release, timeout=10).released
    return response.num_cached_tokens


def kv_bytes(reference: Reference, num_blocks: int) -> int:
    config = reference.config
    block_bytes = 16 * config.num_kv_heads * config.head_dim * reference.pool.cache.element_size()
    return config.num_layers * 2 * num_blocks * block_bytes


def test_repeated_prompt_computes_only_the_uncached_part(stack, reference, tok):
    prompt = text_prompt(tok, "Repeat me", 100)
    expected = reference.greedy(prompt, 12)
    hits_before = stack.stats("prefill").prefix_cache_hit_blocks
    first, cold = generate(stack, prompt, 12)
    second, warm = generate(stack, prompt, 12)
    # 6 full blocks and the 4-token tail are cached: the tail's first 3 tokens are copied, and
    # the last prompt token is computed, and with it the first token.
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 99)
    assert first.first_token_id == second.first_token_id == expected[0]
    assert tokens_of(cold) == tokens_of(warm) == expected
    assert stack.stats("prefill").prefix_cache_hit_blocks - hits_before == 6
    # A block-aligned prompt is fully cached, but its last token is computed again.
    aligned = text_prompt(tok, "Aligned", 96)
    assert [cached_tokens(stack, aligned) for _ in range(2)] == [0, 95]
    assert stack.wait_idle("prefill").num_used_blocks == 0


def test_cache_salt_and_length_cap(stack, tok):
    prompt = text_prompt(tok, "Salted", 90)  # 5 full blocks
    assert cached_tokens(stack, prompt, isolation_key="alice") == 0
    assert cached_tokens(stack, prompt, isolation_key="bob") == 0
    assert cached_tokens(stack, prompt) == 0  # no salt is a salt of its own
    assert cached_tokens(stack, prompt, isolation_key="alice") == 89  # all but the last token
    assert cached_tokens(stack, prompt, isolation_key="bob") == 89
    assert cached_tokens(stack, prompt, isolation_key="alice", max_len=40) == 40
    assert cached_tokens(stack, prompt, isolation_key="alice", max_len=0) == 0
    capped = text_prompt(tok, "Capped", 90)
    assert cached_tokens(stack, capped, max_len=40) == 0
    assert cached_tokens(stack, capped) == 32  # only the capped request's 2 blocks were cached


def test_prompt_diverging_inside_a_block_reuses_the_shared_part(stack, reference, tok):
    base = text_prompt(tok, "Diverge", 60)  # 3 full blocks and the 12-token tail cached
    assert cached_tokens(stack, base) == 0
    other = base[:40] + tok.encode(" Something else entirely, and then some more words.")
    shared = next(i for i, (a, b) in enumerate(zip(base, other, strict=False)) if a != b)
    assert 32 < shared < 48  # two whole blocks, and part of the third
    expected = reference.greedy(other, 8)
    prefilled, responses = generate(stack, other, 8)
    assert prefilled.num_cached_tokens == shared
    assert prefilled.first_token_id == expected[0] and tokens_of(responses) == expected
    # Within the request's cap only.
    assert cached_tokens(stack, other[:-1] + [5], max_len=36) == 36
    assert stack.wait_idle("prefill").num_used_blocks == 0


def test_chunked_prefill_matches_one_pass(stack, reference, tok):
    prompt = text_prompt(tok, "Chunk me", 300)
    expected = reference.greedy(prompt, 8)
    steps_before = stack.stats("prefill_chunked").num_steps
    # Different salts: decode's cache cannot serve the second run with the first one's KV.
    _, chunked = generate(stack, prompt, 8, prefill="prefill_chunked", isolation_key="chunked")
    _, whole = generate(stack, prompt, 8, isolation_key="whole")
    assert tokens_of(chunked) == tokens_of(whole) == expected
    assert stack.stats("prefill_chunked").num_steps - steps_before >= 300 // 32 + 1


def test_short_prompt_overtakes_long_one(stack, tok):
    long_prompt, short_prompt = text_prompt(tok, "Long", 1500), text_prompt(tok, "Short", 20)
    prefill = stack.prefill_stub("prefill_chunked")
    steps_before = stack.stats("prefill_chunked").num_steps
    finished: list[str] = []
    calls = {}
    for name, prompt in (("long", long_prompt), ("short", short_prompt)):
        request = prefill_pb2.PrefillRequest(request_id=name, token_ids=prompt, sampling=GREEDY)
        calls[name] = prefill.Prefill.future(request, timeout=120)
        calls[name].add_done_callback(lambda _, name=name: finished.append(name))
    responses = {name: call.result() for name, call in calls.items()}
    assert finished == ["short", "long"]
    # The long prompt took one pass per 32 tokens, minus what the short one shared.
    assert stack.stats("prefill_chunked").num_steps - steps_before >= 1500 // 32
    for response in responses.values():
        release = prefill_pb2.ReleaseRequest(handle_id=response.kv_handle.handle_id)
        assert prefill.Release(release, timeout=10).released


def test_decode_moves_only_blocks_it_lacks(stack, reference, tok):
    prompt = text_prompt(tok, "Twice through decode", 120)  # 7 full blocks + 8 tokens
    _, first = generate(stack, prompt, 8)
    _, second = generate(stack, prompt, 8)
    assert tokens_of(first) == tokens_of(second) == reference.greedy(prompt, 8)
    assert (first[1].num_reused_blocks, second[1].num_reused_blocks) == (0, 7)
    assert (first[1].kv_bytes, second[1].kv_bytes) == (
        kv_bytes(reference, 8),
        kv_bytes(reference, 1),
    )
    # Block-aligned: decode holds every block, so nothing moves and the handle is released.
    aligned = text_prompt(tok, "Aligned for decode", 112)
    generate(stack, aligned, 4)
    _, again = generate(stack, aligned, 4)
    assert (again[1].kv_transport, again[1].kv_bytes, again[1].num_reused_blocks) == ("none", 0, 7)
    assert stack.wait_idle("prefill").num_pinned_handles == 0
    assert stack.wait_idle("decode").num_used_blocks == 0


def test_shared_memory_and_grpc_transports_agree(stack, reference, tok):
    prompt = text_prompt(tok, "Transport", 150)  # 10 blocks
    # Different salts: decode's own cache holds none of the blocks in any of the runs.
    _, shm = generate(stack, prompt, 8, isolation_key="shm")
    _, pulled = generate(stack, prompt, 8, prefill="prefill_grpc", isolation_key="grpc")
    # A forged pool path in the handle changes nothing: decode maps the pool that the prefill
    # instance which issued the handle reports, and copies the blocks it names.
    prefilled = stack.run_prefill(prompt, isolation_key="forged")
    prefilled.kv_handle.shm_path = "/proc/self/fd/-1"
    forged = list(stack.decode.Generate(generate_request(prompt, prefilled, 8), timeout=120))
    joined = [shm[1], pulled[1], forged[1]]
    assert [r.kv_transport for r in joined] == ["shm", "grpc", "shm"]
    assert [r.kv_bytes for r in joined] == [kv_bytes(reference, 10)] * 3
    assert tokens_of(shm) == tokens_of(pulled) == tokens_of(forged) == reference.greedy(prompt, 8)
    for name in ("prefill", "prefill_grpc"):
        assert stack.wait_idle(name).num_pinned_handles == 0


def test_shared_memory_pull_of_unknown_handle_fails(stack, tok):
    prompt = text_prompt(tok, "Bogus handle", 40)
    prefilled = stack.run_prefill(prompt, isolation_key="bogus")
    assert prefilled.kv_handle.shm_path  # decode will copy from shared memory
    request = generate_request(prompt, prefilled, 8)
    request.kv_handle.handle_id = "no-such-handle"
    stream = stack.decode.Generate(request, timeout=60)
    assert list(next(stream).token_ids) == [prefilled.first_token_id]  # sent before the pull
    error = rpc_error(list, stream)
    assert error.code() == grpc.StatusCode.ABORTED, error.details()
    assert "no-such-handle" in error.details()
    release = prefill_pb2.ReleaseRequest(handle_id=prefilled.kv_handle.handle_id)
    assert stack.prefill.Release(release, timeout=10).released  # decode never took it
    assert stack.wait_idle("decode").num_used_blocks == 0


def test_preempted_sequences_match_their_solo_runs(stack, tok):
    # 4 x (60 + 64) tokens need 32 blocks at their peak; decode_tiny has 16.
    prompts = [text_prompt(tok, f"Preempt {i}", 60) for i in range(4)]
    args = dict(max_tokens=64, ignore_eos=True)
    requests = []
    for prompt in prompts:
        prefilled = stack.run_prefill(prompt, isolation_key="tiny")
        requests.append(generate_request(prompt, prefilled, **args))
    tiny = stack.decode_stub("decode_tiny")
    barrier = threading.Barrier(len(requests))

    def together(request: decode_pb2.GenerateRequest) -> list[int]:
        barrier.wait(timeout=30)
        return tokens_of(tiny.Generate(request, timeout=300))

    def alone() -> list[list[int]]:
        # On the session decode, one request at a time, while decode_tiny runs the four.
        return [tokens_of(generate(stack, p, isolation_key="solo", **args)[1]) for p in prompts]

    with ThreadPoolExecutor(len(requests) + 1) as pool:
        solo = pool.submit(alone)
        batched = list(pool.map(together, requests))
    assert all(len(tokens) == 64 for tokens in batched)
    assert batched == solo.result()
    stats = stack.wait_idle("decode_tiny")
    assert stats.num_preemptions > 0 and stats.max_step_batch_size > 1
    assert (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0)


def test_request_that_can_never_fit_the_pool_is_rejected(stack, tok):
    prompt = text_prompt(tok, "Too big", 60)
    request = generate_request(prompt, stack.run_prefill(prompt), TINY_POOL_TOKENS)
    error = rpc_error(list, stack.decode_stub("decode_tiny").Generate(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"({TINY_POOL_TOKENS} tokens)" in error.details()
    assert stack.wait_idle("prefill").num_pinned_handles == 0  # decode released the handle
    assert stack.wait_idle("decode_tiny").num_used_blocks == 0
