"""The launcher's restarts of a stage process, on fake processes and a fake clock (no model),
and the splitting of its --*-args."""

import pytest

from services import launcher
from services.launcher import Child, RestartPolicy, extra_args, parse_args, supervise_child


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class Stage:
    """One fake stage process: every restart spawns a new FakeProcess."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, policy: RestartPolicy) -> None:
        self.processes = [FakeProcess(1)]
        self.child = Child("prefill", "127.0.0.1:1", "services.prefill", [], self.processes[0])
        self.child.policy = policy
        monkeypatch.setattr(launcher, "spawn", self._spawn)
        monkeypatch.setattr(launcher, "grpc_healthy", lambda address: True)

    def _spawn(self, module: str, args: list[str]) -> FakeProcess:
        self.processes.append(FakeProcess(len(self.processes) + 1))
        return self.processes[-1]

    def crash(self) -> None:
        self.child.process.returncode = 1

    def restart_times(self, start: float, end: float, step: float = 0.5) -> list[float]:
        """Looks at the process every `step` seconds from `start` until `end`, crashing it
        whenever it runs; returns when each restart happened."""
        times, now = [], start
        while now < end:
            spawned = len(self.processes)
            if supervise_child(self.child, now) is not None:
                break
            if len(self.processes) > spawned:
                times.append(now)
            if self.child.process.poll() is None:
                self.crash()
            now += step
        return times


def test_restarts_back_off_exponentially_up_to_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RestartPolicy(backoff_s=1.0, max_backoff_s=4.0, max_restarts=6)
    stage = Stage(monkeypatch, policy)
    stage.crash()
    times = stage.restart_times(0.0, 100.0)
    # Crashed at 0, then again at each restart's next look (+0.5 s): waits of 1, 2, 4, 4, 4, 4.
    assert times == [1.0, 3.5, 8.0, 12.5, 17.0, 21.5]
    assert supervise_child(stage.child, 22.0) == (
        "prefill exited with code 1 after 6 restarts in a row"
    )


def test_a_healthy_run_forgets_earlier_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RestartPolicy(backoff_s=1.0, max_backoff_s=30.0, healthy_run_s=60.0, max_restarts=2)
    stage = Stage(monkeypatch, policy)
    now = 0.0
    for _ in range(10):  # ten crashes over the stack's life, each after a long healthy run
        assert supervise_child(stage.child, now) is None  # healthy: reported ready
        assert stage.child.ready
        assert supervise_child(stage.child, now + 60.0) is None
        stage.crash()
        assert supervise_child(stage.child, now + 61.0) is None  # exited: restart in 1 s
        assert supervise_child(stage.child, now + 62.0) is None
        assert stage.child.process.poll() is None and not stage.child.ready
        now += 100.0
    assert len(stage.processes) == 11 and policy.crashes == 1


def test_a_short_run_keeps_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RestartPolicy(backoff_s=1.0, healthy_run_s=60.0, max_restarts=2)
    stage = Stage(monkeypatch, policy)
    for start in (0.0, 100.0):
        supervise_child(stage.child, start)  # ready
        stage.crash()  # after less than healthy_run_s
        supervise_child(stage.child, start + 59.0)
        supervise_child(stage.child, start + 70.0)
    supervise_child(stage.child, 200.0)
    stage.crash()
    assert "after 2 restarts in a row" in (supervise_child(stage.child, 230.0) or "")


def test_a_real_process_that_keeps_exiting_stops_the_launcher() -> None:
    # A tiny real process (json.tool on a missing file: a usage error, code 2) under the real
    # loop and clock, whose sleeps only wait for the process.
    args = ["/nonexistent/launcher-test.json"]
    child = Child("decode", "127.0.0.1:1", "json.tool", args, launcher.spawn("json.tool", args))
    child.policy = RestartPolicy(backoff_s=0.01, max_backoff_s=0.02, max_restarts=3)
    reason = launcher.supervise([child], sleep=lambda seconds: child.process.wait())
    assert reason == "decode exited with code 2 after 3 restarts in a row"


def test_extra_args_are_split_like_a_shell() -> None:
    args = parse_args(
        [
            "--engine-args",
            "--max-prefill-tokens 128",
            "--decode-args",
            "--model '/models/my model.gguf' --max-batch-size=8",
            "--frontend-args",
            '--api-key "a b"',
        ]
    )
    extras = extra_args(args)
    assert extras["decode"] == [
        "--max-prefill-tokens",
        "128",
        "--model",
        "/models/my model.gguf",
        "--max-batch-size=8",
    ]
    assert extras["prefill"] == ["--max-prefill-tokens", "128"]
    assert extras["frontend"] == ["--api-key", "a b"]
    assert extras["tokenizer"] == []
