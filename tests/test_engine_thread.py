"""The engine thread outlives a failing step and reports when it is dead or stuck."""

import threading
import time

from services.engine.engine_thread import EngineThread


def wait_for(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_a_failing_step_fails_its_work_and_the_thread_goes_on():
    turns: list[str] = []
    errors: list[Exception] = []

    def step() -> bool:
        turns.append("step")
        if len(turns) == 2:
            raise RuntimeError("a bad request broke the schedule")
        return len(turns) < 5

    thread = EngineThread("test-engine", step, errors.append, idle_wait_s=0.01)
    thread.start()
    try:
        assert wait_for(lambda: len(turns) >= 6)
        assert [str(e) for e in errors] == ["a bad request broke the schedule"]
        assert thread.healthy(has_work=True)
    finally:
        thread.stop()
    assert not thread.healthy(has_work=False)  # stopped


def test_a_step_that_never_returns_is_reported_with_work_queued():
    release = threading.Event()

    def step() -> bool:
        release.wait()
        return False

    thread = EngineThread("stuck-engine", step, lambda exc: None, stall_s=0.2)
    thread.start()
    try:
        assert thread.healthy(has_work=True)
        time.sleep(0.3)
        assert not thread.healthy(has_work=True)
        assert thread.healthy(has_work=False)  # idle: nothing waits on it
    finally:
        release.set()
        thread.stop()
