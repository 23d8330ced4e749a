"""With a stage token set, the stages answer only calls that carry it (health checks excepted),
and decode sends it when it pulls from prefill."""

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc import common_pb2, decode_pb2, prefill_pb2
from services.stage_auth import METADATA_KEY, TOKEN_ENV, TokenCheck, stage_channel
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


def test_stage_channels_send_the_token_on_streams_too(monkeypatch):
    """Unary and server-streaming calls alike (Generate, PullKv) carry the token."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)

    async def unary(request: bytes, context) -> bytes:
        return request

    async def stream(request: bytes, context):
        yield request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }

    async def calls() -> tuple[bytes, list[bytes]]:
        server = grpc.aio.server(interceptors=[TokenCheck(TOKEN)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with stage_channel(f"127.0.0.1:{port}", []) as channel:
                answer = await channel.unary_unary("/t.T/Unary")(b"u")
                streamed = [m async for m in channel.unary_stream("/t.T/Stream")(b"s")]
        finally:
            await server.stop(None)
        return answer, streamed

    assert asyncio.run(calls()) == (b"u", [b"s"])
