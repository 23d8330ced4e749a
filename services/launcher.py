"""Starts the four processes on one host, waits until each is healthy, stops them together.

    python -m services.launcher [--model M] [--port 8000]

Ctrl-C or SIGTERM stops all of them; children also get SIGTERM if the launcher dies.
"""

import argparse
import ctypes
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.engine.loader import DEFAULT_MODEL

_PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class Child:
    name: str
    address: str
    process: subprocess.Popen


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(name: str, module: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def grpc_healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_healthy(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def wait_healthy(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while pending:
        for child in list(pending):
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}")
            check = http_healthy if child.name == "frontend" else grpc_healthy
            if check(child.address):
                print(f"ready: {child.name} on {child.address}", flush=True)
                pending.remove(child)
        if time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            raise RuntimeError(f"not healthy after {timeout_s:.0f}s: {names}")
        time.sleep(0.2)


def stop(children: list[Child], grace_s: float = 10.0) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run tokenizer, prefill, decode and frontend")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    parser.add_argument(
        "--grpc-ports",
        default="50051,50052,50053",
        help="tokenizer,prefill,decode ports; 0 picks free ones",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--engine-args", default="", help="extra arguments for prefill and decode, one string"
    )
    parser.add_argument("--prefill-args", default="", help="extra arguments for prefill")
    parser.add_argument("--decode-args", default="", help="extra arguments for decode")
    return parser.parse_args(argv)


def start(args: argparse.Namespace) -> list[Child]:
    ports = [int(p) or free_port(args.host) for p in args.grpc_ports.split(",")]
    http_port = args.port or free_port(args.host)
    addresses = {
        name: f"{args.host}:{port}"
        for name, port in zip(
            ("tokenizer", "prefill", "decode", "frontend"), [*ports, http_port], strict=True
        )
    }
    common = ["--model", args.model, "--host", args.host]
    extras = {
        "tokenizer": [],
        "prefill": [*args.engine_args.split(), *args.prefill_args.split()],
        "decode": [*args.engine_args.split(), *args.decode_args.split()],
    }
    children = []
    for name in ("tokenizer", "prefill", "decode"):
        port = addresses[name].rsplit(":", 1)[1]
        extra = extras[name]
        process = spawn(name, f"services.{name}", [*common, "--port", port, *extra])
        children.append(Child(name, addresses[name], process))
    frontend_args = ["--host", args.host, "--port", str(http_port)]
    for name in ("tokenizer", "prefill", "decode"):
        frontend_args += [f"--{name}", addresses[name]]
    children.append(
        Child("frontend", addresses["frontend"], spawn("frontend", "frontend", frontend_args))
    )
    return children


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_stop_signal(signum, frame) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a launcher started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    children = start(args)
    try:
        wait_healthy(children, args.startup_timeout)
        frontend = children[-1].address
        print(f"serving the API on http://{frontend}/v1 (Ctrl-C stops)", flush=True)
        while all(c.process.poll() is None for c in children):
            time.sleep(0.5)
        dead = [c.name for c in children if c.process.poll() is not None]
        print(f"stopping: {', '.join(dead)} exited", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop(children)


if __name__ == "__main__":
    sys.exit(main())
