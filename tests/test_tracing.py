"""Tracing (--otlp-traces-endpoint): one request sent with a client's W3C traceparent yields
connected spans from all four processes at an OTLP receiver run here; without the flag no
process loads the OpenTelemetry SDK."""

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.conftest import ROOT, Stack, start_stack

SERVICES = ("llmserve-frontend", "llmserve-tokenizer", "llmserve-prefill", "llmserve-decode")
EXPORT_WAIT_S = 30
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the exporting process's resource service.name
    span: trace_pb2.Span

    def attributes(self) -> dict[str, object]:
        return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in self.span.attributes}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self._spans.append(ReceivedSpan(resource["service.name"], span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if s.span.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def traced_stack(receiver: tuple[Receiver, str]) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # ms: export soon after a span ends
        stack = start_stack("--otlp-traces-endpoint", receiver[1])
    yield stack
    stack.stop()


def complete(spans: list[ReceivedSpan], client_span_id: bytes) -> bool:
    """Every process has exported its spans, the request's included: each span's parent is in
    (or is the client's), each client span's server span is in, and decode's KV handoff calls
    to prefill are among them."""
    ids = {s.span.span_id for s in spans} | {client_span_id}
    parents = {s.span.parent_span_id for s in spans if s.span.kind == SERVER}
    clients = [s for s in spans if s.span.kind == CLIENT]
    return (
        {s.service for s in spans} == set(SERVICES)
        and all(s.span.parent_span_id in ids for s in spans)
        and all(c.span.span_id in parents for c in clients)
        and any(c.service == "llmserve-decode" for c in clients)
    )


def test_one_request_is_one_connected_trace_over_four_processes(
    traced_stack: Stack, receiver: tuple[Receiver, str]
) -> None:
    url = traced_stack.http_url
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    trace_id, client_span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{client_span_id.hex()}-01"
    # Long enough that prefill computes it (decode computes short prompts itself).
    content = "Hi! " + "Tell me more. " * 100
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    response = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"traceparent": traceparent}, timeout=120
    )
    assert response.status_code == 200, response.text

    deadline = time.monotonic() + EXPORT_WAIT_S
    while not complete(spans := receiver[0].trace(trace_id), client_span_id):
        if time.monotonic() > deadline:
            pytest.fail(f"incomplete trace: {sorted((s.service, s.span.name) for s in spans)}")
        time.sleep(0.2)

    (request,) = [s for s in spans if s.span.parent_span_id == client_span_id]
    assert (request.service, request.span.kind) == ("llmserve-frontend", SERVER)
    assert request.span.name == "POST /v1/chat/completions"
    attributes = request.attributes()
    assert attributes["http.response.status_code"] == 200
    assert attributes["prompt-tokens"] > 0
    assert attributes["prefill-queue-duration"] >= 0.0
    assert attributes["server-time-to-first-token"] > 0.0

    def children(parent: ReceivedSpan, service: str, kind: int) -> dict[str, ReceivedSpan]:
        return {
            s.span.name: s
            for s in spans
            if s.span.parent_span_id == parent.span.span_id
            and (s.service, s.span.kind) == (service, kind)
        }

    calls = children(request, "llmserve-frontend", CLIENT)
    for stage, rpc in (
        ("tokenizer", "tokenizer.v1.Tokenizer/RenderChat"),
        ("prefill", "prefill.v1.Prefill/Prefill"),
        ("decode", "decode.v1.Decode/Generate"),
    ):
        served = children(calls[rpc], f"llmserve-{stage}", SERVER)
        assert list(served) == [rpc], (rpc, served)
    generate = children(calls["decode.v1.Decode/Generate"], "llmserve-decode", SERVER)
    handoff = children(generate["decode.v1.Decode/Generate"], "llmserve-decode", CLIENT)
    assert handoff and all(name.startswith("prefill.v1.Prefill/") for name in handoff)
    for name, call in handoff.items():
        assert list(children(call, "llmserve-prefill", SERVER)) == [name]


def test_no_sdk_without_the_flag() -> None:
    """A process started without --otlp-traces-endpoint never imports the SDK or exporter."""
    modules = ("frontend.__main__", "services.grpc_server", "services.tokenizer.server")
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
