"""The launcher starts four healthy processes and leaves none behind when stopped."""

import json
import os
import signal
import time

import httpx
import pytest

from tests.conftest import start_stack
from tests.grpc_stack import alive, child_pids


def lock_of(pid: int) -> str | None:
    """The --compute-lock a child process was started with."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    return args[args.index("--compute-lock") + 1] if "--compute-lock" in args else None


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_all_four(stop_signal):
    stack = start_stack("--model", "dummy")
    try:
        assert set(stack.addresses) == {"tokenizer", "prefill", "decode", "frontend"}
        health = httpx.get(f"{stack.http_url}/health", timeout=10)
        assert health.status_code == 200
        children = child_pids(stack.process.pid)
        assert len(children) == 4
        # Prefill and decode share one compute lock, in a directory the launcher removes.
        locks = {lock_of(pid) for pid in children} - {None}
        assert len(locks) == 1 and os.path.exists(next(iter(locks)))
        stack.process.send_signal(stop_signal)
        stack.process.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if alive(pid)]
        assert not os.path.exists(os.path.dirname(next(iter(locks))))
    finally:
        if stack.process.poll() is None:
            os.kill(stack.process.pid, signal.SIGKILL)


def test_stopping_lets_open_streams_finish():
    """SIGTERM stops the frontend first: a stream already open runs to its end, because the
    stages it needs are stopped only after the frontend has finished."""
    stack = start_stack("--model", "dummy")
    try:
        model = httpx.get(f"{stack.http_url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": "a", "max_tokens": 150, "ignore_eos": True}
        events = []
        with httpx.stream(
            "POST", f"{stack.http_url}/v1/completions", json=body | {"stream": True}, timeout=120
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if not events:
                    stack.process.send_signal(signal.SIGTERM)
                events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 1
        assert stack.process.wait(timeout=60) == 0
    finally:
        if stack.process.poll() is None:
            os.kill(stack.process.pid, signal.SIGKILL)


def thread_nices(pid: int) -> dict[int, int]:
    """Nice value of each thread of a process, by thread id."""
    nices = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        nices[int(tid)] = int(fields[16])  # field 19 of stat, counting from the state
    return nices


def test_engines_compute_below_their_event_loops(stack):
    """Prefill's and decode's engine thread and kernel threads run 10 nice levels below the
    process's main thread, which runs the event loop that streams tokens."""
    for stage in ("prefill", "decode"):
        pid = stack.pids[stage]
        nices = thread_nices(pid)
        base, lowered_nice = nices[pid], min(nices[pid] + 10, 19)
        lowered = [tid for tid, nice in nices.items() if nice == lowered_nice]
        assert len(lowered) >= min(2, os.cpu_count() or 1), (stage, nices)  # engine, kernels
        assert set(nices.values()) == {base, lowered_nice}
