"""SIGTERM drains a stage: it refuses new work at once, finishes what it has, then exits."""

import signal
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc import prefill_pb2
from tests.grpc_stack import (
    ENGINE_ARGS,
    Stack,
    rpc_error,
    running,
    start_service,
    tokens_of,
    wait_until,
)

PROMPT = [1, 504, 3458, 282, 4219, 30, 2]


def test_sigterm_lets_decode_finish_open_streams_and_refuse_new_ones():
    services = {
        "prefill": start_service("prefill", *ENGINE_ARGS),
        # The tests' 5 s drain raised, so that the open stream has all the time it needs.
        "decode": start_service("decode", *ENGINE_ARGS, "--drain-s", "60"),
    }
    with running(services):
        stack = Stack(services)
        request = stack.generate_request(PROMPT, 256, request_id="open", ignore_eos=True)
        stream = stack.decode.Generate(request, timeout=120)
        responses = [next(stream)]
        reader = threading.Thread(target=lambda: responses.extend(stream), daemon=True)
        reader.start()
        decode = services["decode"].process
        decode.send_signal(signal.SIGTERM)
        # Health turns NOT_SERVING as the drain begins (in the same turn of decode's loop).
        with services["decode"].channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = wait_until(
                lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status,
                lambda s: s == health_pb2.HealthCheckResponse.NOT_SERVING,
            )
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        new = stack.generate_request(PROMPT, 4, request_id="new")
        refused = rpc_error(lambda: list(stack.decode.Generate(new, timeout=30)))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
        assert reader.is_alive()  # the open stream is still going
        # Refused before taking the KV: it is there for another instance (released here).
        release = prefill_pb2.ReleaseRequest(handle_id=new.kv_handle.handle_id)
        assert stack.prefill.Release(release, timeout=10).released
        reader.join(timeout=60)
        assert len(tokens_of(responses)) == 256  # the open stream finished
        assert decode.wait(timeout=30) in (0, -signal.SIGTERM)
        assert stack.wait_idle("prefill").num_pinned_handles == 0
        stack.close()
