"""systemd's watchdog, fed while the main loop works through a long step that still progresses.

The agent's main loop sends ``WATCHDOG=1`` once per turn. One turn can be long: downloading a
256 MiB model from a slow mirror, the guard process opening it, the first session. Without more,
systemd kills the agent at ``WatchdogSec`` in the middle of a healthy download, and the restarts
look like a crash loop. :class:`Heartbeat` keeps feeding the watchdog from its own thread while the
main loop is inside such a step *and* the step keeps reporting progress (downloaded bytes, a new
update step). A step that reports nothing for ``stall_seconds`` gets no more pings: a hang is
still a hang, and systemd still restarts it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["STALL_SECONDS", "Heartbeat"]

# Longer than any silent step the agent takes on purpose (the guard's default timeout is 60 s).
STALL_SECONDS = 120.0


class Heartbeat:
    def __init__(self, notify: Callable[[str], None], *, interval: float | None,
                 alive: Callable[[], bool], stall_seconds: float = STALL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notify = notify
        self.interval = interval
        self._alive = alive
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._busy = 0
        self._last = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self, *_: object) -> None:
        """Called by a long step whenever it moves (cheap: one float store)."""
        self._last = self._clock()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around one turn of the main loop's work."""
        self.progress()
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def should_ping(self) -> bool:
        return bool(self._busy) and self._clock() - self._last < self.stall_seconds and self._alive()

    def start(self) -> None:
        if self.interval is None:
            return  # not watched by systemd: nothing to feed
        self._thread = threading.Thread(target=self._run, name="agent-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval / 2):
            if self.should_ping():
                self._notify("WATCHDOG=1")
