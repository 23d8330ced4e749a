"""With a stage token set, the stages answer only calls that carry it (health checks excepted),
and decode sends it when it pulls from prefill."""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc import common_pb2, decode_pb2, prefill_pb2
from services.stage_auth import METADATA_KEY, TOKEN_ENV
from tests.grpc_stack import (
    ENGINE_ARGS,
    GREEDY,
    Stack,
    rpc_error,
    running,
    start_service,
    tokens_of,
)

TOKEN = "s3cret-stage-token"
WITH_TOKEN = [(METADATA_KEY, TOKEN)]


def test_stages_answer_only_calls_with_the_token():
    env = {TOKEN_ENV: TOKEN}
    services = {
        "prefill": start_service("prefill", *ENGINE_ARGS, env=env),
        "decode": start_service("decode", *ENGINE_ARGS, env=env),
    }
    with running(services):
        stack = Stack(services)
        info = common_pb2.InfoRequest()
        for stub in (stack.prefill, stack.decode):
            refused = rpc_error(stub.Info, info)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            wrong = rpc_error(lambda s=stub: s.Info(info, metadata=[(METADATA_KEY, "guess")]))
            assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Info(info, metadata=WITH_TOKEN).model.model_id
        with services["decode"].channel() as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        prompt = [1, 504, 3458, 282, 4219, 30, 2]
        request = prefill_pb2.PrefillRequest(request_id="p", token_ids=prompt, sampling=GREEDY)
        prefilled = stack.prefill.Prefill(request, metadata=WITH_TOKEN, timeout=60)
        generate = decode_pb2.GenerateRequest(
            request_id="g",
            kv_handle=prefilled.kv_handle,
            prompt_token_ids=prompt,
            first_token_id=prefilled.first_token_id,
            sampling=GREEDY,
            stopping=common_pb2.Stopping(max_tokens=4, ignore_eos=True),
        )
        # Decode pulls the KV from prefill with the token of its own.
        responses = list(stack.decode.Generate(generate, metadata=WITH_TOKEN, timeout=60))
        assert len(tokens_of(responses)) == 4
        stack.close()
