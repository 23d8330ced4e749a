"""An optional shared token on the stages' gRPC.

With LLMSERVE_STAGE_TOKEN set, a stage answers only calls that carry the token (gRPC health
checks excepted: orchestrators probe without it), compared in constant time, and every stage
client (the frontend, decode pulling from prefill) sends it. Compose and Kubernetes set it
from their environment or a Secret. Without it the stages trust their network: keep them on
127.0.0.1 or behind a NetworkPolicy.
"""

import hmac
import os
from collections.abc import Sequence
from typing import Any

import grpc

from services import tracing

TOKEN_ENV = "LLMSERVE_STAGE_TOKEN"
METADATA_KEY = "x-llmserve-stage-token"
_OPEN_METHODS = "/grpc.health.v1.Health/"


def stage_token() -> str:
    return os.environ.get(TOKEN_ENV, "")


def stage_channel(address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to a stage that sends the token, when there is one, with every call, and
    the trace context when tracing is on."""
    token = stage_token()
    interceptors: list[grpc.aio.ClientInterceptor] = []
    if token:
        # One per call kind: a channel files an interceptor under the first kind it
        # implements only, so one for both would leave streams (Generate, PullKv) without.
        interceptors += [_SendTokenUnary(token), _SendTokenStream(token)]
    if tracing.enabled():
        interceptors += tracing.client_interceptors()
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors or None)


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) a call without the token, before its handler runs."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_METHODS):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get(METADATA_KEY, "")).encode()
        if hmac.compare_digest(given, self._token):
            return handler

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong stage token")

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                refuse, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )


class _SendToken:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(METADATA_KEY, self._token)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _SendTokenUnary(_SendToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _SendTokenStream(_SendToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)
