"""Bootstrap shared by the tokenizer, prefill and decode services.

Every service gets grpc.health.v1, reflection, one interceptor that maps exceptions to
status codes (and, with tracing on, one that continues the caller's trace), and a clean stop
on SIGINT/SIGTERM (health turns NOT_SERVING first).
"""

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services import tracing
from services.errors import ServiceError
from services.stage_auth import TokenCheck, stage_token

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DRAIN_GRACE_S = 2.0  # after draining, for the calls still open
HEALTH_CHECK_S = 1.0  # how often an engine service checks its engine for its gRPC health
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, str(exc))
    log.exception("unhandled error in %s", type(exc).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a servicer into status codes instead of opaque UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                try:
                    return await inner(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - every error gets a status
                    await _abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context) -> AsyncIterator:
                try:
                    # aclosing: when this generator is closed, the handler's own finally
                    # blocks run now, not whenever the garbage collector gets to it.
                    async with contextlib.aclosing(inner_stream(request, context)) as items:
                        async for item in items:
                            yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def advertised_host(bind_host: str) -> str:
    """How other processes reach this one: the bind host, or for a wildcard bind (0.0.0.0 in
    a container) this host's own address, which KV handles carry to decode."""
    if bind_host not in _WILDCARD_HOSTS:
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


async def serve(
    name: str,
    address: str,
    register: Callable[[grpc.aio.Server, str], list[str]],
    on_stop: Callable[[], Awaitable[None]] | None = None,
    healthy: Callable[[], bool] | None = None,
    drain: Callable[[float], Awaitable[None]] | None = None,
    drain_s: float = 0.0,
    max_requests: int | None = None,
) -> None:
    """Serves until SIGINT/SIGTERM.

    `register(server, bound_address)` adds the servicers and returns their full names; the
    bound address has the real port when `address` asked for port 0. `healthy`, checked every
    HEALTH_CHECK_S, turns the gRPC health of every service to NOT_SERVING while it is false.
    On SIGTERM the health turns NOT_SERVING, then `drain(deadline)` (a time.monotonic())
    refuses new work and returns when the open work is done or `drain_s` has passed; the
    server then stops, giving calls still open DRAIN_GRACE_S. Beyond `max_requests` calls in
    flight, gRPC refuses new ones with RESOURCE_EXHAUSTED.
    """
    token = stage_token()
    interceptors: list[grpc.aio.ServerInterceptor] = [TokenCheck(token)] if token else []
    if tracing.enabled():
        interceptors.append(tracing.ServerSpans())
    server = grpc.aio.server(
        options=CHANNEL_OPTIONS,
        interceptors=[*interceptors, ErrorInterceptor()],
        maximum_concurrent_rpcs=max_requests,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"{name}: cannot bind {address}")
    host = advertised_host(address.rsplit(":", 1)[0])
    service_names = register(server, f"{host}:{port}")
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    await server.start()
    for service in ["", *service_names]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"{name} serving on {host}:{port}", flush=True)
    watch = None
    if healthy is not None:
        watch = asyncio.create_task(_watch_health(name, health_servicer, service_names, healthy))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    if watch is not None:
        watch.cancel()
    await health_servicer.enter_graceful_shutdown()
    if drain is not None:
        log.info("%s: draining for up to %.0f s", name, drain_s)
        await drain(time.monotonic() + drain_s)
    await server.stop(grace=DRAIN_GRACE_S)
    if on_stop is not None:
        await on_stop()


async def _watch_health(
    name: str,
    servicer: health.aio.HealthServicer,
    service_names: list[str],
    healthy: Callable[[], bool],
) -> None:
    serving = True
    while True:
        await asyncio.sleep(HEALTH_CHECK_S)
        now = healthy()
        if now != serving:
            serving = now
            status = health_pb2.HealthCheckResponse.SERVING
            if not now:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
                log.error("%s: the engine is dead or stuck; reporting NOT_SERVING", name)
            for service in ["", *service_names]:
                await servicer.set(service, status)
