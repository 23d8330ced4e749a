"""The thread an engine runs its steps on: it steps while there is work, else sleeps.

Prefill and decode each own one. The event loop hands work to the engine and calls
`wake()`; an idle thread also wakes every `idle_wait_s`, which is when prefill expires
leases that nobody pulled.
"""

import threading
from collections.abc import Callable


class EngineThread:
    def __init__(self, name: str, step: Callable[[], bool], idle_wait_s: float = 0.5) -> None:
        """`step` runs one step if there is work and returns whether there was any."""
        self._step = step
        self._idle_wait_s = idle_wait_s
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=5)

    def wake(self) -> None:
        self._wakeup.set()

    def _loop(self) -> None:
        while not self._stopped:
            if not self._step():
                self._wakeup.wait(timeout=self._idle_wait_s)
                self._wakeup.clear()
