"""In-process fake stages for the frontend tests: real gRPC on ephemeral ports, no model.

The fake tokenizer maps each character to its code point (plus BOS 1 for text), the fake
decode spells "abcdefg..." one token per message. Both record what they were sent.
"""

import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from frontend.config import FrontendConfig
from services.rpc import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

MODEL_ID = "fake-model"
MAX_MODEL_LEN = 64
BOS = 1
VOCAB_SIZE = 256
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _info(service: str, max_model_len: int) -> common_pb2.InfoResponse:
    return common_pb2.InfoResponse(
        service=service,
        instance=f"fake-{service}",
        model=common_pb2.ModelInfo(model_id=MODEL_ID, context_length=MAX_MODEL_LEN),
        limits=common_pb2.Limits(max_model_len=max_model_len),
    )


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    def Tokenize(self, request, context):  # noqa: N802 (gRPC method name)
        if request.WhichOneof("input") == "token_ids":
            ids = list(request.token_ids.ids)
            if any(i >= VOCAB_SIZE for i in ids):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id out of range")
        else:
            ids = [BOS] * request.add_special_tokens + [ord(c) for c in request.text]
        return tokenizer_pb2.TokenizeResponse(token_ids=ids, queue_ns=1000, duration_ns=2000)

    def RenderChat(self, request, context):  # noqa: N802
        text = "".join(f"{m.role}:{m.content}\n" for m in request.messages)
        ids = [BOS] + [ord(c) for c in text]
        return tokenizer_pb2.TokenizeResponse(token_ids=ids, queue_ns=1000, duration_ns=2000)

    def Info(self, request, context):  # noqa: N802
        return _info("tokenizer", 0)


@dataclass
class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    requests: list[prefill_pb2.PrefillRequest] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    def Prefill(self, request, context):  # noqa: N802
        self.requests.append(request)
        handle = common_pb2.KvHandle(handle_id=f"kv-{request.request_id}", num_tokens=3)
        return prefill_pb2.PrefillResponse(
            kv_handle=handle,
            first_token_id=ord("a"),
            queue_ns=3000,
            compute_ns=4000,
            num_cached_tokens=2,
        )

    def Release(self, request, context):  # noqa: N802
        self.released.append(request.handle_id)
        return prefill_pb2.ReleaseResponse(released=True)

    def Info(self, request, context):  # noqa: N802
        return _info("prefill", MAX_MODEL_LEN)


@dataclass
class FakeDecode(decode_pb2_grpc.DecodeServicer):
    # "normal" | "endless" (until cancelled) | "stall" (no first message) | "unavailable"
    mode: str = "normal"
    requests: list[decode_pb2.GenerateRequest] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def Generate(self, request, context):  # noqa: N802
        self.requests.append(request)
        if self.mode in ("endless", "stall"):
            # Fires when the RPC ends; these modes only end by cancellation. (A cancelled
            # stream's generator is simply not resumed, so checking in the loop is not enough.)
            context.add_callback(self.cancelled.set)
        if self.mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "decode is draining")
        if self.mode == "stall":
            while context.is_active():
                time.sleep(0.01)
            return
        text = ""
        for i in range(10**6):
            if self.mode == "endless":
                time.sleep(0.01)
            piece = chr(request.first_token_id) if i == 0 else ALPHABET[i % len(ALPHABET)]
            text += piece
            finish, piece = self._finish(request, text, piece, i + 1)
            yield decode_pb2.GenerateResponse(
                token_ids=[ord(piece[:1] or "?")],
                text=piece,
                finish_reason=finish,
                num_generated=i + 1,
                queue_ns=5000 if i == 0 else 0,
                kv_transfer_ns=6000 if i == 0 else 0,
            )
            if finish:
                return

    def _finish(self, request, text: str, piece: str, num_generated: int) -> tuple[int, str]:
        for stop in request.stopping.stop:
            if stop in text:
                # Cut the stop string and what follows it, as the real decode does.
                sent = len(text) - len(piece)
                return decode_pb2.FINISH_REASON_STOP, text[sent : max(sent, text.index(stop))]
        if self.mode != "endless" and num_generated >= request.stopping.max_tokens:
            return decode_pb2.FINISH_REASON_LENGTH, piece
        return decode_pb2.FINISH_REASON_UNSPECIFIED, piece

    def Info(self, request, context):  # noqa: N802
        return _info("decode", MAX_MODEL_LEN)


@dataclass
class FakeStages:
    tokenizer: FakeTokenizer
    prefill: FakePrefill
    decode: FakeDecode
    addresses: dict[str, str]
    servers: list[grpc.Server]

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


def start_fake_stages(ports: dict[str, int] | None = None) -> FakeStages:
    """Serves the three fakes, on `ports` when given, else on ephemeral ones."""
    servicers = {"tokenizer": FakeTokenizer(), "prefill": FakePrefill(), "decode": FakeDecode()}
    adders = {
        "tokenizer": tokenizer_pb2_grpc.add_TokenizerServicer_to_server,
        "prefill": prefill_pb2_grpc.add_PrefillServicer_to_server,
        "decode": decode_pb2_grpc.add_DecodeServicer_to_server,
    }
    addresses, servers = {}, []
    for stage, servicer in servicers.items():
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        adders[stage](servicer, server)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{(ports or {}).get(stage, 0)}")
        server.start()
        addresses[stage] = f"127.0.0.1:{port}"
        servers.append(server)
    return FakeStages(
        servicers["tokenizer"], servicers["prefill"], servicers["decode"], addresses, servers
    )


def dead_stages_config(served_model_name: str | None) -> FrontendConfig:
    """A frontend config whose stages are all down: nothing listens on their ports."""
    addresses = []
    for _ in range(3):
        # A port that was free a moment ago.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            addresses.append(f"127.0.0.1:{sock.getsockname()[1]}")
    return FrontendConfig(*addresses, served_model_name=served_model_name)
