"""Starts the stages on one host, waits until each is healthy, stops them together.

    python -m services.launcher [--model M] [--port 8000] [--prefill N] [--decode M]

One tokenizer, N prefill and M decode processes, and the frontend over all of them. A stage
process that exits after start-up is started again on its port (the frontend routes around
it meanwhile and takes it back once it is healthy); the frontend exiting stops everything.
Ctrl-C or SIGTERM stops all of them, the frontend first so that it finishes its open requests;
children also get SIGTERM if the launcher dies.
"""

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from services.engine.loader import DEFAULT_MODEL
from services.healthcheck import grpc_healthy, http_all_serving

_PR_SET_PDEATHSIG = 1
STAGES = ("tokenizer", "prefill", "decode")
# A stage process that exits this many times after start-up is given up on (and all stop).
MAX_RESTARTS = 5
FRONTEND_STOP_S = 300.0
STAGE_STOP_S = 40.0  # the stages drain for up to 30 s (--drain-s)


@dataclass(slots=True)
class Child:
    name: str
    address: str
    module: str
    args: list[str]
    process: subprocess.Popen
    restarts: int = 0
    ready: bool = False

    @property
    def is_frontend(self) -> bool:
        return self.module == "frontend"

    def healthy(self) -> bool:
        """A stage: grpc.health.v1 SERVING. The frontend: it sees every instance serving, so
        that traffic sent once the stack is reported ready spreads over all of them."""
        return (http_all_serving if self.is_frontend else grpc_healthy)(self.address)

    def restart(self) -> None:
        self.restarts += 1
        self.ready = False
        self.process = spawn(self.module, self.args)

    def report_ready(self) -> None:
        self.ready = True
        print(f"ready: {self.name} on {self.address} (pid {self.process.pid})", flush=True)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(module: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def wait_healthy(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while pending:
        for child in list(pending):
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}")
            if child.healthy():
                child.report_ready()
                pending.remove(child)
        if time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            raise RuntimeError(f"not healthy after {timeout_s:.0f}s: {names}")
        time.sleep(0.2)


def stop(children: list[Child], grace_s: float = STAGE_STOP_S) -> None:
    """The frontend first, so that it finishes its open requests while the stages still
    serve them, then the stages, killed if they take longer than `grace_s`. Each bounds its
    own wait (the frontend's --graceful-shutdown-s, the stages' --drain-s); these limits only
    catch a hung one."""
    _stop_group([c for c in children if c.is_frontend], FRONTEND_STOP_S)
    _stop_group([c for c in children if not c.is_frontend], grace_s)


def _stop_group(children: list[Child], grace_s: float) -> None:
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
    parser.add_argument("--host", default="127.0.0.1", help="where the HTTP API listens")
    parser.add_argument(
        "--stage-host",
        default="127.0.0.1",
        help="where the stages' gRPC listens, whatever --host is: the stages trust their "
        "callers (unless LLMSERVE_STAGE_TOKEN is set), so keep them private",
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    parser.add_argument(
        "--grpc-ports",
        default="50051,50052,50053",
        help="tokenizer,prefill,decode ports (each stage's first instance; the others take "
        "free ports); 0 picks free ones",
    )
    parser.add_argument("--prefill", type=int, default=1, help="prefill processes")
    parser.add_argument("--decode", type=int, default=1, help="decode processes")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--engine-args", default="", help="extra arguments for prefill and decode, one string"
    )
    parser.add_argument("--prefill-args", default="", help="extra arguments for prefill")
    parser.add_argument("--decode-args", default="", help="extra arguments for decode")
    parser.add_argument("--frontend-args", default="", help="extra arguments for the frontend")
    parser.add_argument(
        "--no-compute-lock",
        dest="compute_lock",
        action="store_false",
        help="let prefill's and decode's CPU forward passes overlap (by default they take "
        "turns, each with all cores)",
    )
    parser.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="all four processes export trace spans over OTLP/gRPC to this collector (e.g. "
        "http://collector:4317); off by default",
    )
    args = parser.parse_args(argv)
    if args.prefill < 1 or args.decode < 1:
        parser.error("--prefill and --decode need at least 1")
    return args


def _engine_threads(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Without the compute lock, several engine processes share the host's cores: unless
    told otherwise, each gets an equal share of torch threads rather than all of them (which
    oversubscribes the CPU). With it, their passes take turns and each uses every core."""
    num_engines = args.prefill + args.decode
    if args.compute_lock or num_engines <= 2 or "--threads" in extra:
        return []
    return ["--threads", str(max(1, (os.cpu_count() or 1) // num_engines))]


def start(args: argparse.Namespace, run_dir: str) -> list[Child]:
    """Starts every stage; `run_dir` holds the engines' shared compute lock."""
    first_ports = dict(zip(STAGES, (int(p) for p in args.grpc_ports.split(",")), strict=True))
    counts = {"tokenizer": 1, "prefill": args.prefill, "decode": args.decode}
    endpoint = args.otlp_traces_endpoint
    tracing = ["--otlp-traces-endpoint", endpoint] if endpoint else []
    common = ["--model", args.model, "--host", args.stage_host, *tracing]
    extras = {
        "tokenizer": [],
        "prefill": [*args.engine_args.split(), *args.prefill_args.split()],
        "decode": [*args.engine_args.split(), *args.decode_args.split()],
    }
    children: list[Child] = []
    addresses: dict[str, list[str]] = {}
    lock = ["--compute-lock", os.path.join(run_dir, "compute.lock")] if args.compute_lock else []
    for stage in STAGES:
        extra = extras[stage]
        if stage != "tokenizer":
            extra = [*_engine_threads(args, extra), *lock, *extra]
        if stage == "decode":  # the prefill instances whose KV it may pull
            extra = ["--prefill", ",".join(addresses["prefill"]), *extra]
        for i in range(counts[stage]):
            port = (first_ports[stage] if i == 0 else 0) or free_port(args.stage_host)
            address = f"{args.stage_host}:{port}"
            name = stage if counts[stage] == 1 else f"{stage}-{i + 1}"
            module = f"services.{stage}"
            stage_args = [*common, "--port", str(port), *extra]
            children.append(Child(name, address, module, stage_args, spawn(module, stage_args)))
            addresses.setdefault(stage, []).append(address)
    http_port = args.port or free_port(args.host)
    frontend_args = ["--host", args.host, "--port", str(http_port), *tracing]
    for stage in STAGES:
        frontend_args += [f"--{stage}", ",".join(addresses[stage])]
    frontend_args += args.frontend_args.split()
    frontend = spawn("frontend", frontend_args)
    children.append(
        Child("frontend", f"{args.host}:{http_port}", "frontend", frontend_args, frontend)
    )
    return children


def supervise(children: list[Child]) -> str:
    """Restarts stage processes that exit and reports them ready again; returns why it
    stopped (the frontend exited, or a process kept failing)."""
    while True:
        for child in children:
            code = child.process.poll()
            if code is not None:
                if child.is_frontend:
                    return f"frontend exited with code {code}"
                if child.restarts >= MAX_RESTARTS:
                    return f"{child.name} exited with code {code} after {child.restarts} restarts"
                print(f"restarting {child.name}: it exited with code {code}", flush=True)
                child.restart()
            elif not child.ready and child.healthy():
                child.report_ready()
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_stop_signal(signum, frame) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a launcher started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    run_dir = tempfile.TemporaryDirectory(prefix="llmserve-")
    children = start(args, run_dir.name)
    try:
        wait_healthy(children, args.startup_timeout)
        frontend = children[-1].address
        print(f"serving the API on http://{frontend}/v1 (Ctrl-C stops)", flush=True)
        print(f"stopping: {supervise(children)}", file=sys.stderr, flush=True)
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
        run_dir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
