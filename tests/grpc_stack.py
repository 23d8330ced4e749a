"""The tokenizer, prefill and decode services as subprocesses, and sync stubs to call them.

A service runs as `python -m services.<name> --port 0` on 127.0.0.1; it is ready once it
prints `<name> serving on HOST:PORT`.
"""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from services.grpc_server import CHANNEL_OPTIONS
from services.rpc import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    tokenizer_pb2_grpc,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20
T = TypeVar("T")
# Unset sampling fields take the API's defaults (temperature 1): tests that compare outputs
# ask for greedy decoding.
GREEDY = common_pb2.SamplingParams(temperature=0.0)
# float32 everywhere, so the services compute exactly what tests/engine_reference.py does.
# A handle a test leaves pinned holds a draining prefill at most 5 s (not the 30 s default).
ENGINE_ARGS = ("--dtype", "float32", "--threads", "1", "--drain-s", "5")
PREFILL_KV_TOKENS, DECODE_KV_TOKENS, MAX_BATCH = 2048, 4096, 8


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)
    address: str = ""
    _ready: threading.Event = field(default_factory=threading.Event)

    def _drain(self) -> None:
        assert self.process.stdout is not None
        marker = f"{self.name} serving on "
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith(marker):
                self.address = line[len(marker) :].strip()
                self._ready.set()
        self._ready.set()  # exited: wait_ready reports it

    def wait_ready(self) -> str:
        if not self._ready.wait(STARTUP_TIMEOUT_S) or not self.address:
            self.process.kill()
            tail = "".join(self.output[-30:])
            raise RuntimeError(f"{self.name} did not start:\n{tail}")
        return self.address

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def stop(self) -> int:
        """SIGTERM, then the exit code; fails if the process outlives STOP_TIMEOUT_S."""
        children = child_pids(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        leftovers = [pid for pid in children if alive(pid)]
        assert not leftovers, f"{self.name} left child processes {leftovers}"
        return code


def start_service(name: str, *args: str, env: dict[str, str] | None = None) -> ServiceProcess:
    """Starts `python -m services.<name>` on a free port (`env` added to this process's);
    call wait_ready() before use."""
    cmd = [sys.executable, "-m", f"services.{name}", "--port", "0", "--log-level", "WARNING"]
    process = subprocess.Popen(
        [*cmd, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    service = ServiceProcess(name, process)
    threading.Thread(target=service._drain, daemon=True).start()
    return service


@contextlib.contextmanager
def running(services: dict[str, ServiceProcess]) -> Iterator[dict[str, ServiceProcess]]:
    """Waits until every started service serves, yields them, then stops them all.

    The stop must be clean: exit code 0 or -SIGTERM, no child left, the ports closed.
    """
    try:
        for service in services.values():
            service.wait_ready()
        yield services
    finally:
        codes = {name: service.stop() for name, service in services.items()}
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), codes
    assert not [s.address for s in services.values() if port_open(s.address)]


def child_pids(pid: int) -> list[int]:
    try:
        return [
            int(p) for p in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def wait_until(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 15) -> T:
    """Polls `probe` until `done(value)` or the timeout; returns the last value."""
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = probe()
    return value


class Stack:
    """Stubs for the running services, keyed by the names they were started under.

    `prefill` and `decode` name the instances `run_prefill` and `generate` use; more
    instances of either kind may run under other names (stubs from `*_stub(name)`).
    """

    def __init__(self, services: dict[str, ServiceProcess]) -> None:
        self.services = services
        self.channels = {name: s.channel() for name, s in services.items()}
        if "tokenizer" in self.channels:
            self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self.channels["tokenizer"])
        self.prefill = prefill_pb2_grpc.PrefillStub(self.channels["prefill"])
        self.decode = decode_pb2_grpc.DecodeStub(self.channels["decode"])

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def prefill_stub(self, name: str) -> prefill_pb2_grpc.PrefillStub:
        return prefill_pb2_grpc.PrefillStub(self.channels[name])

    def decode_stub(self, name: str) -> decode_pb2_grpc.DecodeStub:
        return decode_pb2_grpc.DecodeStub(self.channels[name])

    def info(self, name: str) -> common_pb2.InfoResponse:
        stub_class = {
            "tokenizer": tokenizer_pb2_grpc.TokenizerStub,
            "prefill": prefill_pb2_grpc.PrefillStub,
            "decode": decode_pb2_grpc.DecodeStub,
        }[self.services[name].name]  # the kind of service, whatever it was started as
        return stub_class(self.channels[name]).Info(common_pb2.InfoRequest(), timeout=10)

    def stats(self, name: str) -> common_pb2.Stats:
        return self.info(name).stats

    def wait_idle(self, name: str, timeout_s: float = 15) -> common_pb2.Stats:
        """Stats once `name` holds no blocks, handles or sequences (or at the timeout)."""

        def idle(stats: common_pb2.Stats) -> bool:
            busy = (stats.num_used_blocks, stats.num_pinned_handles, stats.num_running)
            return busy == (0, 0, 0) and stats.num_waiting == 0

        return wait_until(lambda: self.stats(name), idle, timeout_s)

    def run_prefill(
        self,
        prompt: list[int],
        sampling: common_pb2.SamplingParams = GREEDY,
        prefill: str = "prefill",
        **prompt_cache: object,
    ) -> prefill_pb2.PrefillResponse:
        """prompt_cache: `isolation_key`, `max_len` of the PrefillRequest's PromptCache."""
        request = prefill_pb2.PrefillRequest(
            request_id="p",
            token_ids=prompt,
            sampling=sampling,
            prompt_cache=common_pb2.PromptCache(**prompt_cache),
        )
        return self.prefill_stub(prefill).Prefill(request, timeout=60)

    def generate_request(
        self, prompt: list[int], max_tokens: int, request_id: str = "g", **kwargs
    ) -> decode_pb2.GenerateRequest:
        """Prefills `prompt` and returns the Generate request that continues it.

        kwargs: `sampling` (common_pb2.SamplingParams), `stop`, `ignore_eos`, `include_stop_str`.
        """
        sampling = kwargs.pop("sampling", GREEDY)
        prefilled = self.run_prefill(prompt, sampling)
        return decode_pb2.GenerateRequest(
            request_id=request_id,
            kv_handle=prefilled.kv_handle,
            prompt_token_ids=prompt,
            first_token_id=prefilled.first_token_id,
            sampling=sampling,
            stopping=common_pb2.Stopping(max_tokens=max_tokens, **kwargs),
            # Mirostat's state after prefill's token, as the frontend passes it on.
            mirostat_mu=prefilled.mirostat_mu if prefilled.HasField("mirostat_mu") else None,
        )

    def generate(self, prompt: list[int], max_tokens: int, **kwargs) -> list:
        request = self.generate_request(prompt, max_tokens, **kwargs)
        return list(self.decode.Generate(request, timeout=120))


def tokens_of(responses: list) -> list[int]:
    return [token_id for response in responses for token_id in response.token_ids]


def rpc_error(call: Callable[..., object], *args: object) -> grpc.RpcError:
    """The error `call(*args)` fails with (the test fails if it succeeds)."""
    try:
        call(*args)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded")
