"""Optional OpenTelemetry tracing, shared by the four processes.

Off unless a process is started with --otlp-traces-endpoint: only then are the SDK and the OTLP
exporter imported and a tracer provider set. Without one, the API's spans are no-ops and no
interceptor is installed. A traced process is `llmserve-<role>` (resource `service.name`) and
exports its spans in batches over OTLP/gRPC (BatchSpanProcessor; the OTEL_BSP_* variables tune
it).

The W3C `traceparent` travels in gRPC metadata: every stage channel (the frontend's, and
decode's to prefill for the KV handoff) sends it with the calls made inside a traced span
(`client_interceptors`), and each stage continues it in a server span per call
(`ServerSpans`). Calls outside any trace (health checks, the frontend's periodic Info polls)
carry none and get none.
"""

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SERVICE_NAME_PREFIX = "llmserve-"
TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()


def configure(role: str, endpoint: str | None) -> None:
    """Exports this process's spans to the OTLP/gRPC collector at `endpoint` (a URL such as
    http://collector:4317); does nothing without one."""
    if not endpoint:
        return
    # Imported only here, so that a process without tracing never loads them.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: SERVICE_NAME_PREFIX + role})
    # The provider flushes its batches at exit.
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)


def enabled() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _tracer() -> trace.Tracer:
    return trace.get_tracer("llmserve")


def _rpc_name(method: str | bytes) -> str:
    """`/prefill.v1.Prefill/Prefill` -> `prefill.v1.Prefill/Prefill`, the span's name."""
    return (method.decode() if isinstance(method, bytes) else method).lstrip("/")


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span for each call made inside a traced span, sent along as the call's
    `traceparent`; the span ends with the call (a stream's once it has ended). One
    interceptor per call kind: a grpc.aio channel files each under the first kind it
    implements only."""
    return [_UnaryUnarySpans(), _UnaryStreamSpans()]


class _ClientSpans:
    def __init__(self) -> None:
        # Span endings waiting for their call's status, held so they are not collected.
        self._endings: set[asyncio.Task[None]] = set()

    async def _traced(self, continuation, details: grpc.aio.ClientCallDetails, request: Any):
        if not trace.get_current_span().is_recording():
            return await continuation(details, request)
        span = _tracer().start_span(
            _rpc_name(details.method), kind=SpanKind.CLIENT, attributes={"rpc.system": "grpc"}
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        call.add_done_callback(lambda done: self._end_later(span, done))
        return call

    def _end_later(self, span: Span, call: grpc.aio.Call) -> None:
        # The status of a finished call is read with an await: a done callback cannot.
        task = asyncio.get_running_loop().create_task(_end(span, call))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)


class _UnaryUnarySpans(_ClientSpans, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._traced(continuation, client_call_details, request)


class _UnaryStreamSpans(_ClientSpans, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._traced(continuation, client_call_details, request)


async def _end(span: Span, call: grpc.aio.Call) -> None:
    code = await call.code()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    # CANCELLED is the caller's own choice: the frontend ends a Generate stream once it has
    # the last message, and a request whose client went away cancels its calls.
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class ServerSpans(grpc.aio.ServerInterceptor):
    """A server span around each call that carries a `traceparent`, continuing its trace; what
    the handler calls meanwhile (decode's KV pull from prefill) nests under it."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler is None or TRACEPARENT not in metadata:
            return handler
        parent = _PROPAGATOR.extract(metadata)
        name = _rpc_name(handler_call_details.method)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                with _server_span(name, parent):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                with _server_span(name, parent):
                    async with contextlib.aclosing(inner_stream(request, context)) as items:
                        async for item in items:
                            yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


@contextlib.contextmanager
def _server_span(name: str, parent: Context) -> Iterator[Span]:
    with _tracer().start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes={"rpc.system": "grpc"}
    ) as span:
        yield span
