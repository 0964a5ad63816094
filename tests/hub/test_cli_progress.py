"""The CLI's progress display without a hub: bars, redraws on a terminal, lines elsewhere, polling."""

from __future__ import annotations

import io
import json

from edgefleet.hub.adapters.client import UploadBody
from edgefleet.hub.cli.progress import Display, bar, poll, upload_progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar() -> None:
    assert bar(0, 4, width=8) == "[........] 0/4"
    assert bar(3, 4, width=8) == "[######..] 3/4"
    assert bar(9, 4, width=8) == "[########] 9/4"
    assert bar(0, 0, width=4) == "[####] 0/0"


def test_a_pipe_gets_each_changed_frame_once_and_a_terminal_gets_it_redrawn() -> None:
    pipe = io.StringIO()
    d = Display(stream=pipe)
    for text in ("a\nb", "a\nb", "c"):
        d.show(text)
    assert pipe.getvalue() == "a\nb\nc\n"
    tty = Tty()
    d = Display(stream=tty)
    d.show("a\nb")
    d.show("c")
    assert tty.getvalue() == "a\nb\n\x1b[2F\x1b[Jc\n"  # up two lines, clear, draw
    lines = io.StringIO()
    d = Display(json_lines=True, stream=lines)
    for obj in ({"s": 1}, {"s": 1}, {"s": 2}):
        d.show("ignored", obj)
    assert [json.loads(x) for x in lines.getvalue().splitlines()] == [{"s": 1}, {"s": 2}]


def test_a_device_message_cannot_move_the_cursor() -> None:
    tty = Tty()
    Display(stream=tty).show("device says \x1b[2Jhello")
    assert "\x1b[2J" not in tty.getvalue()


def test_poll_stops_when_finished_or_at_the_timeout() -> None:
    now = [0.0]
    values = iter(range(100))
    seen: list[int] = []

    def sleep(s: float) -> None:
        now[0] += s

    last, ok = poll(lambda: next(values), lambda v: v == 3, seen.append, interval=1.0, timeout=10, clock=lambda: now[0],
                    sleep=sleep)
    assert (last, ok, seen) == (3, True, [0, 1, 2, 3])
    last, ok = poll(lambda: next(values), lambda v: False, seen.append, interval=1.0, timeout=2.5,
                    clock=lambda: now[0], sleep=sleep)
    assert ok is False and now[0] >= 5.5


def test_upload_body_reports_progress_and_can_be_sent_again() -> None:
    got: list[tuple[int, int]] = []
    body = UploadBody(b"x" * (UploadBody.CHUNK * 2 + 5), lambda s, t: got.append((s, t)))
    assert b"".join(body) == b"x" * (UploadBody.CHUNK * 2 + 5)
    assert got[-1] == (UploadBody.CHUNK * 2 + 5,) * 2 and len(got) == 3
    assert len(b"".join(body)) == UploadBody.CHUNK * 2 + 5  # iterable again
    assert upload_progress(io.StringIO()) is None  # not a terminal: no display
    tty = Tty()
    show = upload_progress(tty, min_bytes=10)
    assert show is not None
    show(2 << 20, 4 << 20)
    show(4 << 20, 4 << 20)
    assert "2/4" in tty.getvalue() and tty.getvalue().endswith("\n")
