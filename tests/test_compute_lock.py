"""Engine processes sharing a compute lock never overlap their passes, and take turns."""

import subprocess
import sys
import time
from pathlib import Path

from services.engine.compute_lock import ComputeLock

ROOT = Path(__file__).resolve().parent.parent
PASSES, PASS_S = 25, 0.004

# Says it is ready, waits for the start file, then runs PASSES passes under the lock,
# printing their spans.
WORKER = f"""
import sys, time
from pathlib import Path
from services.engine.compute_lock import ComputeLock
lock = ComputeLock(sys.argv[1])
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
for _ in range({PASSES}):
    with lock.held():
        start = time.monotonic_ns()
        time.sleep({PASS_S})
        print(start, time.monotonic_ns(), flush=True)
"""


def run_passes(lock: ComputeLock) -> list[tuple[int, int]]:
    spans = []
    for _ in range(PASSES):
        with lock.held():
            start = time.monotonic_ns()
            time.sleep(PASS_S)
            spans.append((start, time.monotonic_ns()))
    return spans


def test_two_processes_alternate_their_passes(tmp_path):
    path, go = tmp_path / "compute.lock", tmp_path / "go"
    other = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), str(go)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    lock = ComputeLock(str(path))
    try:
        assert other.stdout.readline() == "ready\n"
        go.touch()
        ours = run_passes(lock)
        out, _ = other.communicate(timeout=30)
    finally:
        other.kill()
        lock.close()
    theirs = [tuple(map(int, line.split())) for line in out.splitlines()]
    spans = sorted([(s, e, "ours") for s, e in ours] + [(s, e, "theirs") for s, e in theirs])
    assert len(spans) == 2 * PASSES
    # Mutual exclusion: each pass starts after the previous one ended.
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False))
    # Turns: while both want the CPU, neither runs twice in a row (the first pass of the
    # process that arrives second may find the other already queued).
    owners = [owner for _, _, owner in spans]
    repeats = sum(a == b for a, b in zip(owners, owners[1:], strict=False))
    both_busy = owners[: 2 * PASSES - 2]
    assert repeats <= 2 and len(set(both_busy)) == 2, owners
