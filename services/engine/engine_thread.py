"""The thread an engine runs its steps on: it steps while there is work, else sleeps.

Prefill and decode each own one. The event loop hands work to the engine and calls
`wake()`; an idle thread also wakes every `idle_wait_s`, which is when prefill expires
leases that nobody pulled.

A step that raises does not end the thread: the engine's `on_error` fails the work it holds
(whatever state broke the step goes with it) and the thread goes on. `healthy()` is what the
service's gRPC health reports: the thread is alive, and it finished a step within `stall_s`
whenever there was work.
"""

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STALL_S = 60.0  # no step finished for this long with work queued: the engine is stuck


class EngineThread:
    def __init__(
        self,
        name: str,
        step: Callable[[], bool],
        on_error: Callable[[Exception], None],
        idle_wait_s: float = 0.5,
        stall_s: float = STALL_S,
        on_start: Callable[[], None] = lambda: None,
    ) -> None:
        """`step` runs one step if there is work and returns whether there was any;
        `on_start` runs first, on the thread."""
        self._name = name
        self._on_start = on_start
        self._step = step
        self._on_error = on_error
        self._idle_wait_s = idle_wait_s
        self._stall_s = stall_s
        self._wakeup = threading.Event()
        self._stopped = False
        self._last_turn = time.monotonic()  # when a step last returned (or the thread began)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._last_turn = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=5)

    def wake(self) -> None:
        self._wakeup.set()

    def healthy(self, has_work: bool) -> bool:
        """Alive, and not stuck in a step while `has_work` (work is queued or running)."""
        if not self._thread.is_alive():
            return False
        return not has_work or time.monotonic() - self._last_turn < self._stall_s

    def _loop(self) -> None:
        self._on_start()
        while not self._stopped:
            try:
                worked = self._step()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one step
                log.exception("%s: a step failed; failing the work it held", self._name)
                self._on_error(exc)
                worked = False
            self._last_turn = time.monotonic()
            if not worked:
                self._wakeup.wait(timeout=self._idle_wait_s)
                self._wakeup.clear()
