"""In-process fake stages for the frontend tests: real gRPC on ephemeral ports, no model.

The fake tokenizer maps each character to its code point (plus BOS 1 for text), the fake
decode spells "abcdefg..." one token per message. Both record what they were sent. With
sampling.logprobs, token t gets logprob `fake_logprob(t)` and `top_logprobs` alternatives
"A", "B", ... (`fake_top`); prompt logprobs likewise.
"""

import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

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
BOS_TEXT = "<s>"
VOCAB_SIZE = 256
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
NOTES = {"reasoning_effort": "reasoning_effort has no effect: the model is not a reasoning model"}
# What the fake prefill and decode report in Info.stats.
FAKE_STATS = {
    "prefill": common_pb2.Stats(
        num_used_blocks=3,
        num_free_blocks=13,
        prefix_cache_queried_blocks=40,
        prefix_cache_hit_blocks=30,
    ),
    "decode": common_pb2.Stats(
        num_running=2,
        num_waiting=1,
        num_used_blocks=5,
        num_free_blocks=11,
        kv_cache_bytes=16 * 737280,
        weight_bytes=123456,
    ),
}


def _info(service: str, max_model_len: int) -> common_pb2.InfoResponse:
    return common_pb2.InfoResponse(
        service=service,
        instance=f"fake-{service}",
        model=common_pb2.ModelInfo(
            model_id=MODEL_ID, context_length=MAX_MODEL_LEN, vocab_size=VOCAB_SIZE, notes=NOTES
        ),
        limits=common_pb2.Limits(max_model_len=max_model_len),
        stats=FAKE_STATS.get(service),
    )


def token_text(token_id: int) -> str:
    return BOS_TEXT if token_id == BOS else chr(token_id)


def fake_logprob(token_id: int) -> float:
    return -0.25 * (1 + token_id % 5)


def fake_top(count: int) -> list[common_pb2.TopLogprob]:
    return [
        common_pb2.TopLogprob(
            token_id=ord("A") + i,
            logprob=-0.125 * (i + 1),
            token=chr(ord("A") + i),
            token_bytes=chr(ord("A") + i).encode(),
        )
        for i in range(count)
    ]


def fake_token_logprob(token_id: int, top_logprobs: int) -> common_pb2.TokenLogprob:
    text = token_text(token_id)
    return common_pb2.TokenLogprob(
        token_id=token_id,
        logprob=fake_logprob(token_id),
        token=text,
        token_bytes=text.encode(),
        top=fake_top(top_logprobs),
    )


def _sleep_and_time(delay_s: float) -> dict[str, int]:
    """Spends `delay_s` and reports half of it as queueing, half as work."""
    if delay_s:
        time.sleep(delay_s)
    half = int(delay_s * 1e9 / 2)
    return {"queue_ns": half, "work_ns": half}


@dataclass
class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    delay_s: float = 0.0  # > 0: each call takes this long, reported as half queue, half work
    renders: list[tokenizer_pb2.RenderChatRequest] = field(default_factory=list)

    def _response(self, ids: list[int], text: str) -> tokenizer_pb2.TokenizeResponse:
        if self.delay_s:
            timing = _sleep_and_time(self.delay_s)
            queue_ns, duration_ns = timing["queue_ns"], timing["work_ns"]
        else:
            queue_ns, duration_ns = 1000, 2000
        return tokenizer_pb2.TokenizeResponse(
            token_ids=ids, prompt=text, queue_ns=queue_ns, duration_ns=duration_ns
        )

    def Tokenize(self, request, context):  # noqa: N802 (gRPC method name)
        if request.WhichOneof("input") == "token_ids":
            ids = list(request.token_ids.ids)
            if any(i >= VOCAB_SIZE for i in ids):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token id out of range")
            return self._response(ids, "")
        ids = [BOS] * request.add_special_tokens + [ord(c) for c in request.text]
        return self._response(ids, request.text)

    def RenderChat(self, request, context):  # noqa: N802
        self.renders.append(request)
        text = "".join(f"{m.role}:{m.content}\n" for m in request.messages)
        return self._response([BOS] + [ord(c) for c in text], text)

    def Detokenize(self, request, context):  # noqa: N802
        ids = [i for i in request.token_ids if not (request.skip_special_tokens and i == BOS)]
        return tokenizer_pb2.DetokenizeResponse(text="".join(map(token_text, ids)))

    def Info(self, request, context):  # noqa: N802
        return _info("tokenizer", 0)


@dataclass
class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    requests: list[prefill_pb2.PrefillRequest] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    delay_s: float = 0.0  # as FakeTokenizer.delay_s
    full: bool = False  # answers RESOURCE_EXHAUSTED, as a prefill whose queue is full
    # When (time.monotonic) each Prefill call started and returned, by request id.
    started: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)

    def Prefill(self, request, context):  # noqa: N802
        self.started[request.request_id] = time.monotonic()
        self.requests.append(request)
        if self.full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "40000 prompt tokens queued")
        handle = common_pb2.KvHandle(handle_id=f"kv-{request.request_id}", num_tokens=3)
        timing = _sleep_and_time(self.delay_s) if self.delay_s else {}
        response = prefill_pb2.PrefillResponse(
            kv_handle=handle,
            first_token_id=ord("a"),
            queue_ns=timing.get("queue_ns", 3000),
            compute_ns=timing.get("work_ns", 4000),
            num_cached_tokens=2,
        )
        if request.sampling.HasField("mirostat_target"):
            response.mirostat_mu = 2 * request.sampling.mirostat_target - 0.5
        top = request.sampling.top_logprobs
        if request.sampling.logprobs:
            response.first_token_logprob.CopyFrom(fake_token_logprob(ord("a"), top))
        if request.prompt_logprobs:
            response.prompt_logprobs.extend(
                fake_token_logprob(t, top) for t in request.token_ids[1:]
            )
        self.finished[request.request_id] = time.monotonic()
        return response

    def Release(self, request, context):  # noqa: N802
        self.released.append(request.handle_id)
        return prefill_pb2.ReleaseResponse(released=True)

    def Info(self, request, context):  # noqa: N802
        return _info("prefill", MAX_MODEL_LEN)


@dataclass
class FakeDecode(decode_pb2_grpc.DecodeServicer):
    # "normal" | "endless" (until cancelled) | "stall" (no first message) | "unavailable"
    # | "kv_lost" (the first token, then the request's KV is lost: ABORTED)
    mode: str = "normal"
    requests: list[decode_pb2.GenerateRequest] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    token_delay_s: float = 0.0  # between tokens, in "normal" mode

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
            elif self.token_delay_s and i:
                time.sleep(self.token_delay_s)
            # With compute_prompt the first token is sampled here, as the fake prefill does.
            first_id = ord("a") if request.compute_prompt else request.first_token_id
            token = chr(first_id) if i == 0 else ALPHABET[i % len(ALPHABET)]
            text += token
            finish, piece = self._finish(request, text, token, i + 1)
            response = decode_pb2.GenerateResponse(
                token_ids=[ord(token)],
                text=piece,
                finish_reason=finish,
                num_generated=i + 1,
                # As decode does: prefill's token first, then the KV pull and the join,
                # which the next message reports.
                queue_ns=5000 if i == 1 and not request.compute_prompt else 0,
                kv_transfer_ns=6000 if i == 1 and not request.compute_prompt else 0,
            )
            if i == 0 and request.compute_prompt:
                response.prefill_queue_ns, response.prefill_compute_ns = 7000, 8000
                response.num_cached_tokens = 2
            if request.sampling.logprobs:
                first = request.first_token_logprob
                if request.compute_prompt:
                    first = fake_token_logprob(ord("a"), request.sampling.top_logprobs)
                top = request.sampling.top_logprobs
                response.logprobs.append(first if i == 0 else fake_token_logprob(ord(token), top))
            yield response
            if finish:
                return
            if self.mode == "kv_lost":
                context.abort(grpc.StatusCode.ABORTED, "the prompt's KV was lost; retry")

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
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
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


def fake_config(fakes: FakeStages, **overrides: Any) -> FrontendConfig:
    """A frontend config that serves the fakes. Every prompt goes to prefill unless
    `local_prefill_tokens` says otherwise: the tests check each stage's requests."""
    return FrontendConfig(
        tokenizer_address=fakes.addresses["tokenizer"],
        prefill_address=fakes.addresses["prefill"],
        decode_address=fakes.addresses["decode"],
        **{"local_prefill_tokens": 0, **overrides},
    )


def dead_stages_config(served_model_name: str | None) -> FrontendConfig:
    """A frontend config whose stages are all down: nothing listens on their ports."""
    addresses = []
    for _ in range(3):
        # A port that was free a moment ago.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            addresses.append(f"127.0.0.1:{sock.getsockname()[1]}")
    tokenizer, prefill, decode = addresses
    return FrontendConfig(tokenizer, prefill, decode, served_model_name=served_model_name)
