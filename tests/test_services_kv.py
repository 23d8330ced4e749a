"""KV handles between prefill and decode over real gRPC: pulls, releases, leases, aborts and
bad requests. The services are the session's, shared with tests/test_services.py."""

import collections

import grpc
import pytest
import torch

from services.engine.attention import tokens_kv
from services.engine.tokenizer import Tokenizer
from services.rpc import decode_pb2, prefill_pb2
from tests.engine_reference import Reference
from tests.grpc_stack import Stack, rpc_error, tokens_of, wait_until

pytest_plugins = ["tests.grpc_fixtures"]

STORY = "Once upon a time, in a small village,"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
ABORTED = grpc.StatusCode.ABORTED


@pytest.fixture
def stack(services_stack: Stack) -> Stack:
    return services_stack


@pytest.fixture
def prompt(default_tokenizer: Tokenizer) -> list[int]:
    return default_tokenizer.encode(STORY)


def pull(stack: Stack, handle_id: str, service: str = "prefill") -> list[prefill_pb2.KvChunk]:
    stub = stack.prefill if service == "prefill" else stack.prefill_stub(service)
    return list(stub.PullKv(prefill_pb2.PullKvRequest(handle_id=handle_id), timeout=60))


def test_pull_kv_matches_engine(stack, engine_reference: Reference, default_tokenizer):
    text = " ".join(f"Item {i} is {i * i}." for i in range(400))
    prompt = default_tokenizer.encode(text)[:1400]  # 88 blocks: over 1 MiB per layer in float16
    handle = stack.run_prefill(prompt).kv_handle
    chunks = pull(stack, handle.handle_id)
    config = engine_reference.config
    block_shape = [config.num_kv_heads, 16 * config.head_dim]
    dtype = engine_reference.runner.pool.cache.dtype  # the services' default, as the reference's
    assert handle.num_blocks == 88 and len(chunks) > config.num_layers
    covered = collections.Counter()
    # [num_layers, 2, num_blocks, num_kv_heads, block_size * head_dim]
    pulled = torch.full((config.num_layers, 2, handle.num_blocks, *block_shape), float("nan"))
    for c in chunks:
        assert getattr(torch, c.dtype) == dtype and list(c.shape) == [c.num_blocks, *block_shape]
        covered.update((c.layer, b) for b in range(c.block_offset, c.block_offset + c.num_blocks))
        for kv, data in enumerate((c.k, c.v)):
            values = torch.frombuffer(bytearray(data), dtype=dtype).view(*c.shape)
            pulled[c.layer, kv, c.block_offset : c.block_offset + c.num_blocks] = values
    assert covered == {(layer, b): 1 for layer in range(config.num_layers) for b in range(88)}
    expected = engine_reference.prompt_kv(prompt)
    pulled_tokens = tokens_kv(pulled, list(range(88)), config.head_dim)[:, :, :1400]
    torch.testing.assert_close(pulled_tokens, expected.float(), atol=1e-3, rtol=1e-3)
    assert rpc_error(pull, stack, handle.handle_id).code() == NOT_FOUND
    assert stack.wait_idle("prefill").num_used_blocks == 0


def test_a_full_prefill_queue_refuses_the_next_prompt(stack, default_tokenizer):
    short = stack.prefill_stub("prefill_short")
    text = " ".join(f"Item {i} is {i * i}." for i in range(100))
    first, second = (default_tokenizer.encode(f"{tag} {text}")[:500] for tag in "AB")
    running = short.Prefill.future(prefill_pb2.PrefillRequest(request_id="a", token_ids=first))

    def busy(stats) -> bool:
        return stats.num_running + stats.num_waiting > 0

    assert busy(wait_until(lambda: stack.stats("prefill_short"), busy, 30))  # "a" is in
    refused = rpc_error(short.Prefill, prefill_pb2.PrefillRequest(request_id="b", token_ids=second))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert "queued" in refused.details()
    running.result(timeout=60)
    assert stack.wait_idle("prefill_short").num_used_blocks == 0  # the lease freed the first
    accepted = short.Prefill(prefill_pb2.PrefillRequest(request_id="c", token_ids=second))
    assert accepted.kv_handle.num_tokens == 500


def test_release_frees_blocks(stack, prompt):
    handle = stack.run_prefill(prompt).kv_handle
    stats = stack.stats("prefill")
    assert (stats.num_pinned_handles, stats.num_used_blocks) == (1, handle.num_blocks)
    release = prefill_pb2.ReleaseRequest(handle_id=handle.handle_id)
    assert stack.prefill.Release(release).released
    stats = stack.stats("prefill")
    assert (stats.num_pinned_handles, stats.num_used_blocks) == (0, 0)
    assert not stack.prefill.Release(release).released
    assert rpc_error(pull, stack, handle.handle_id).code() == NOT_FOUND


def test_lease_frees_unpulled_handle(stack, prompt):
    short = stack.prefill_stub("prefill_short")
    response = short.Prefill(prefill_pb2.PrefillRequest(request_id="lease", token_ids=prompt))
    assert response.kv_handle.lease_ms == 1000
    stats = stack.wait_idle("prefill_short")
    assert (stats.num_pinned_handles, stats.num_used_blocks) == (0, 0)
    handle_id = response.kv_handle.handle_id
    assert rpc_error(pull, stack, handle_id, "prefill_short").code() == NOT_FOUND


def start_long_generation(stack: Stack, prompt: list[int], request_id: str, max_tokens: int):
    """A Generate stream three tokens in, with the sequence running in decode."""
    request = stack.generate_request(prompt, max_tokens, request_id=request_id, ignore_eos=True)
    stream = stack.decode.Generate(request, timeout=120)
    assert [len(next(stream).token_ids) for _ in range(3)] == [1, 1, 1]
    stats = stack.stats("decode")
    assert stats.num_running == 1 and stats.num_used_blocks > 0
    return stream, stats.num_steps


def assert_stopped_early(stack: Stack, steps_before: int, max_tokens: int) -> None:
    """Decode is idle again, long before the sequence could have reached max_tokens."""
    stats = stack.wait_idle("decode", timeout_s=120)
    assert (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0)
    assert stats.num_steps - steps_before < max_tokens // 2
    assert stack.stats("prefill").num_pinned_handles == 0


def test_cancel_generate_frees_decode(stack, prompt):
    stream, steps = start_long_generation(stack, prompt, "cancel-me", 1000)
    stream.cancel()
    assert rpc_error(list, stream).code() == grpc.StatusCode.CANCELLED
    assert_stopped_early(stack, steps, 1000)


def test_abort_rpc_frees_decode(stack, prompt):
    stream, steps = start_long_generation(stack, prompt, "abort-me", 1000)
    response = stack.decode.Abort(decode_pb2.AbortRequest(request_id="abort-me"), timeout=10)
    assert response.aborted
    assert rpc_error(list, stream).code() == grpc.StatusCode.CANCELLED
    assert_stopped_early(stack, steps, 1000)
    unknown = stack.decode.Abort(decode_pb2.AbortRequest(request_id="nobody"), timeout=10)
    assert not unknown.aborted


@pytest.mark.parametrize(
    "token_ids", [[], [1, 49152], [-1, 2], [1] * 8192], ids=["empty", "high", "negative", "long"]
)
def test_prefill_rejects_bad_tokens(stack, prompt, token_ids):
    request = prefill_pb2.PrefillRequest(request_id="bad", token_ids=token_ids)
    assert rpc_error(stack.prefill.Prefill, request).code() == INVALID
    assert len(tokens_of(stack.generate(prompt, 2))) == 2
    assert stack.wait_idle("prefill").num_used_blocks == 0


def _set(path: str, value):
    def mutate(request: decode_pb2.GenerateRequest) -> None:
        *parents, name = path.split(".")
        target = request
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(value, list):
            target.ClearField(name)
            getattr(target, name).extend(value)
        else:
            setattr(target, name, value)

    return mutate


# (mutation of a valid request, expected status, whether decode must release the real handle)
BAD_GENERATE = {
    "max_tokens_0": (_set("stopping.max_tokens", 0), INVALID, True),
    "empty_prompt": (_set("prompt_token_ids", []), INVALID, True),
    "prompt_mismatch": (_set("prompt_token_ids", [1, 2, 3]), INVALID, True),
    "first_token_high": (_set("first_token_id", 49152), INVALID, True),
    "first_token_negative": (_set("first_token_id", -3), INVALID, True),
    "prompt_token_high": (lambda r: r.prompt_token_ids.__setitem__(0, 60000), INVALID, True),
    "block_size_mismatch": (_set("kv_handle.block_size", 8), INVALID, True),
    "num_blocks_mismatch": (_set("kv_handle.num_blocks", 10**6), INVALID, True),
    # The request's own KV is lost (decode is fine): ABORTED, which no client takes for down.
    "unknown_handle": (_set("kv_handle.handle_id", "no-such-handle"), ABORTED, False),
    "prefill_unreachable": (_set("kv_handle.prefill_address", "127.0.0.1:1"), ABORTED, False),
    # Decode dials only the prefill instances it knows (here: on loopback).
    "prefill_unknown": (_set("kv_handle.prefill_address", "192.0.2.1:50052"), INVALID, False),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_decode_rejects_bad_requests(stack, prompt, case):
    mutate, code, releases = BAD_GENERATE[case]
    request = stack.generate_request(prompt, 4, request_id=case)
    handle_id = request.kv_handle.handle_id
    mutate(request)
    error = rpc_error(list, stack.decode.Generate(request, timeout=60))
    assert error.code() == code, error.details()
    if not releases:
        stack.prefill.Release(prefill_pb2.ReleaseRequest(handle_id=handle_id))
    assert stack.wait_idle("prefill").num_pinned_handles == 0
    assert stack.wait_idle("decode").num_used_blocks == 0
    assert len(tokens_of(stack.generate(prompt, 3))) == 3
