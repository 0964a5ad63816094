"""systemd's notify protocol in a dozen lines: datagrams to ``$NOTIFY_SOCKET``.

No-op when the variable is unset (not running under ``Type=notify``). Abstract-namespace sockets
(``@name``) are supported.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self._addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(self, message: str) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # systemd went away; nothing useful to do
            self._sock.sendto(message.encode(), self._addr)
