"""Progress for long CLI commands: ``publish`` (upload), ``deploy --wait``, ``rollout ... --watch``.

On a terminal the frame is redrawn in place (plain ANSI: cursor up, clear to the end); when the
output is not a terminal (a pipe, a CI log) a frame is printed only when it changed, one after
the other, and with ``--json`` each change is one JSON line, for machines. Nothing here talks to
the hub: the commands pass a function that fetches.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from edgefleet.hub.cli.commands import safe, safe_lines

__all__ = ["Display", "bar", "poll", "upload_progress", "wait_for_version", "watch_rollout"]


def bar(done: int, total: int, width: int = 30) -> str:
    """``[#######.......]  7/15`` (a full bar for an empty total)."""
    filled = width if total <= 0 else round(width * min(done, total) / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


class Display:
    """Where frames go (stdout by default); ``json``: one JSON line per changed object."""

    def __init__(self, *, json_lines: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.json = json_lines
        self.tty = not json_lines and self.stream.isatty()
        self._last: str | None = None
        self._lines = 0

    def show(self, text: str, obj: Any = None) -> None:
        """Draw ``text`` (or write ``obj`` as a JSON line) if it differs from the last frame."""
        frame = json.dumps(obj, sort_keys=True) if self.json else safe_lines(text)
        if frame == self._last:
            return
        self._last = frame
        if self.tty and self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")  # back to the frame's first line, clear below
        self.stream.write(frame + "\n")
        self.stream.flush()
        self._lines = frame.count("\n") + 1


def poll(fetch: Callable[[], Any], finished: Callable[[Any], bool], draw: Callable[[Any], None], *,
         interval: float, timeout: float | None, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> tuple[Any, bool]:
    """Fetch and draw every ``interval`` seconds until ``finished`` (then ``(last, True)``) or
    ``timeout`` seconds (``(last, False)``)."""
    deadline = None if timeout is None else clock() + timeout
    while True:
        value = fetch()
        draw(value)
        if finished(value):
            return value, True
        if deadline is not None and clock() >= deadline:
            return value, False
        sleep(interval if deadline is None else max(0.0, min(interval, deadline - clock())))


def upload_progress(stream: TextIO, *, min_bytes: int = 1 << 20) -> Callable[[int, int], None] | None:
    """``publish``'s upload display on ``stream`` (stderr): a bar redrawn on one line, only on a
    terminal and for bodies of at least ``min_bytes``; None (no display) otherwise."""
    if not stream.isatty():
        return None
    started = time.monotonic()

    def show(sent: int, total: int) -> None:
        if total < min_bytes:
            return
        rate = sent / max(time.monotonic() - started, 1e-6) / 2**20
        stream.write(f"\r  {bar(sent // 2**20, total // 2**20 or 1)} MiB  {rate:.1f} MiB/s")
        if sent >= total:
            stream.write("\n")
        stream.flush()

    return show


def wait_for_version(client: Any, model: str, version: str, devices: list[str], *, timeout: float,
                     interval: float, json_lines: bool) -> int:
    """``deploy --wait``: until every device in ``devices`` reports running ``version`` of
    ``model`` (0), or ``timeout`` seconds (1, naming the devices that are not there and why)."""
    display = Display(json_lines=json_lines)
    want = set(devices)

    def fetch() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        after = ""
        while True:
            page = client.request("GET", "/api/v1/status", params={"limit": 5000, "after": after})
            out.update({d["device"]: d for d in page["devices"] if d["device"] in want})
            if not page.get("next"):
                return out
            after = page["next"]

    def there(st: dict[str, dict[str, Any]]) -> list[str]:
        return sorted(d for d in want if st.get(d, {}).get("models", {}).get(model) == version)

    def draw(st: dict[str, dict[str, Any]]) -> None:
        done = there(st)
        pending = sorted(want - set(done))
        text = f"{bar(len(done), len(want))} devices run {safe(model)} {safe(version)}"
        if pending:
            text += "\n  waiting for: " + ", ".join(safe(d) for d in pending[:8]) + (" …" if len(pending) > 8 else "")
        display.show(text, {"model": model, "version": version, "done": done, "pending": pending})

    st, ok = poll(fetch, lambda s: len(there(s)) == len(want), draw, interval=interval, timeout=timeout)
    if ok:
        return 0
    late = sorted(want - set(there(st)))
    why = [f"{safe(d)}: {safe(st.get(d, {}).get('status', 'unknown'))}, runs "
           f"{safe(st.get(d, {}).get('models', {}).get(model) or 'nothing')}" for d in late]
    print(f"timed out after {timeout:.0f} s: {len(late)} of {len(want)} device(s) do not run "
          f"{safe(model)} {safe(version)} yet:\n  " + "\n  ".join(why), file=sys.stderr)
    return 1


TERMINAL = ("promoted", "rolled_back", "aborted")


def watch_rollout(client: Any, rollout: str, render: Callable[[dict[str, Any]], str], *, timeout: float | None,
                  interval: float, json_lines: bool) -> int:
    """``rollout start|status --watch``: redraw the rollout until a decision ends it: 0 when
    promoted, 1 when rolled back or aborted, 2 at ``timeout`` (still running or paused)."""
    display = Display(json_lines=json_lines)

    def fetch() -> dict[str, Any]:
        rows = client.rollouts(rollout)
        return dict(rows[0])

    r, ok = poll(fetch, lambda x: x["state"] in TERMINAL, lambda x: display.show(render(x), x),
                 interval=interval, timeout=timeout)
    if not ok:
        return 2
    return 0 if r["state"] == "promoted" else 1
