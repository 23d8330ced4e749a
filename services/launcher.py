"""Starts the stages on one host, waits until each is healthy, stops them together.

    python -m services.launcher [--model M] [--port 8000] [--prefill N] [--decode M]

One tokenizer, N prefill and M decode processes, and the frontend over all of them. A stage
process that exits after start-up is started again on its port (the frontend routes around
it meanwhile and takes it back once it is healthy), after a delay that doubles with each
crash in a row; the frontend exiting stops everything.
Ctrl-C or SIGTERM stops all of them, the frontend first so that it finishes its open requests;
children also get SIGTERM if the launcher dies.
"""

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from services.engine.config import DEFAULT_MODEL
from services.healthcheck import grpc_healthy, http_all_serving

_PR_SET_PDEATHSIG = 1
STAGES = ("tokenizer", "prefill", "decode")
# A stage process that exits this many times in a row after start-up is given up on (and all
# stop). In a row: a run that stays healthy HEALTHY_RUN_S forgets the crashes before it.
MAX_RESTARTS = 5
HEALTHY_RUN_S = 60.0
# The n-th restart in a row waits RESTART_BACKOFF_S * 2**(n-1), at most MAX_RESTART_BACKOFF_S: a
# crash loop (a port still taken, a full disk) neither spins nor ends the stack at once.
RESTART_BACKOFF_S = 1.0
MAX_RESTART_BACKOFF_S = 30.0
SUPERVISE_INTERVAL_S = 0.5
FRONTEND_STOP_S = 300.0
STAGE_STOP_S = 40.0  # the stages drain for up to 30 s (--drain-s)


@dataclass(slots=True)
class RestartPolicy:
    """When a stage process that exited starts again. Times are time.monotonic() seconds."""

    backoff_s: float = RESTART_BACKOFF_S
    max_backoff_s: float = MAX_RESTART_BACKOFF_S
    healthy_run_s: float = HEALTHY_RUN_S
    max_restarts: int = MAX_RESTARTS
    crashes: int = 0  # exits in a row, each followed by a restart
    healthy_since: float | None = None

    def ready(self, now: float) -> None:
        self.healthy_since = now

    def running(self, now: float) -> None:
        """A live process that has been healthy for healthy_run_s has its crashes forgotten."""
        if self.healthy_since is not None and now - self.healthy_since >= self.healthy_run_s:
            self.crashes = 0

    def exited(self) -> float | None:
        """Seconds to wait before restarting, or None to give up."""
        self.healthy_since = None
        if self.crashes >= self.max_restarts:
            return None
        self.crashes += 1
        return min(self.max_backoff_s, self.backoff_s * 2 ** (self.crashes - 1))


@dataclass(slots=True)
class Child:
    name: str
    address: str
    module: str
    args: list[str]
    process: subprocess.Popen
    ready: bool = False
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    restart_at: float | None = None  # a restart is due then (the process exited)

    @property
    def is_frontend(self) -> bool:
        return self.module == "frontend"

    def healthy(self) -> bool:
        """A stage: grpc.health.v1 SERVING. The frontend: it sees every instance serving, so
        that traffic sent once the stack is reported ready spreads over all of them."""
        return (http_all_serving if self.is_frontend else grpc_healthy)(self.address)

    def restart(self) -> None:
        self.ready = False
        self.restart_at = None
        self.process = spawn(self.module, self.args)

    def report_ready(self, now: float) -> None:
        self.ready = True
        self.policy.ready(now)
        say(f"ready: {self.name} on {self.address} (pid {self.process.pid})")


def say(line: str, stream: TextIO | None = None) -> None:
    """Writes one line in one write: the children log to the same output, and a line split
    over two writes (print's text, then its newline, when unbuffered) lets theirs in between."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


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
                child.report_ready(time.monotonic())
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


def extra_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each process's extra arguments, split as a shell would (quoted paths keep spaces)."""
    engine = shlex.split(args.engine_args)
    return {
        "tokenizer": [],
        "prefill": [*engine, *shlex.split(args.prefill_args)],
        "decode": [*engine, *shlex.split(args.decode_args)],
        "frontend": shlex.split(args.frontend_args),
    }


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
    extras = extra_args(args)
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
    frontend_args += extras["frontend"]
    frontend = spawn("frontend", frontend_args)
    children.append(
        Child("frontend", f"{args.host}:{http_port}", "frontend", frontend_args, frontend)
    )
    return children


def supervise(
    children: list[Child],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Restarts stage processes that exit and reports them ready again; returns why it
    stopped (the frontend exited, or a process kept failing)."""
    while True:
        for child in children:
            stopped = supervise_child(child, clock())
            if stopped is not None:
                return stopped
        sleep(SUPERVISE_INTERVAL_S)


def supervise_child(child: Child, now: float) -> str | None:
    """One look at one process: restarts it when due, or says why everything must stop."""
    code = child.process.poll()
    if code is None:
        child.policy.running(now)
        if not child.ready and child.healthy():
            child.report_ready(now)
        return None
    if child.is_frontend:
        return f"frontend exited with code {code}"
    if child.restart_at is None:  # it has just exited
        delay = child.policy.exited()
        if delay is None:
            crashes = child.policy.crashes
            return f"{child.name} exited with code {code} after {crashes} restarts in a row"
        say(f"restarting {child.name} in {delay:g} s: it exited with code {code}")
        child.restart_at = now + delay
    if now >= child.restart_at:
        child.restart()
    return None


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
        say(f"serving the API on http://{frontend}/v1 (Ctrl-C stops)")
        say(f"stopping: {supervise(children)}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        say(f"error: {exc}", sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop(children)
        run_dir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
