"""systemd's notify protocol in a few lines: datagrams to ``$NOTIFY_SOCKET``.

No-op when the variable is unset (not running under ``Type=notify``). Abstract-namespace sockets
(``@name``) are supported. ``WATCHDOG=1`` is paced by ``$WATCHDOG_USEC`` (``WatchdogSec=``): it
goes out at most once per half interval, as sd_watchdog_enabled(3) recommends, however often the
main loop turns; without ``$WATCHDOG_USEC`` (or when ``$WATCHDOG_PID`` names another process)
systemd watches nothing and keep-alives are not sent at all.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier"]


class Notifier:
    def __init__(
        self,
        address: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if env is None else env
        addr = address if address is not None else env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self._addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._clock = clock
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._next_watchdog = 0.0

    def __call__(self, message: str) -> None:
        if self._sock is None:
            return
        if message == "WATCHDOG=1":
            now = self._clock()
            if self.watchdog_interval is None or now < self._next_watchdog:
                return
            self._next_watchdog = now + self.watchdog_interval
        with contextlib.suppress(OSError):  # systemd went away; nothing useful to do
            self._sock.sendto(message.encode(), self._addr)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
