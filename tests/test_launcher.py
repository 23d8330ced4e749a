"""The launcher starts four healthy processes and leaves none behind when stopped."""

import os
import signal
import time

import httpx
import pytest

from tests.conftest import start_stack
from tests.grpc_stack import alive, child_pids


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_all_four(stop_signal):
    stack = start_stack("--model", "dummy")
    try:
        assert set(stack.addresses) == {"tokenizer", "prefill", "decode", "frontend"}
        health = httpx.get(f"{stack.http_url}/health", timeout=10)
        assert health.status_code == 200
        children = child_pids(stack.process.pid)
        assert len(children) == 4
        stack.process.send_signal(stop_signal)
        stack.process.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if alive(pid)]
    finally:
        if stack.process.poll() is None:
            os.kill(stack.process.pid, signal.SIGKILL)
