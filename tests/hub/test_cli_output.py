"""What a device says reaches the operator's terminal as text, never as terminal control: the CLI
escapes control characters (C0, DEL, C1, ANSI sequences, Unicode line and bidi controls) in
every field a device chose, so an event cannot forge a line, overwrite one or colour the screen."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.contract.wire import Event, Reported
from edgefleet.hub.cli.commands import safe, safe_lines
from tests.conftest import run_cli
from tests.hub._served import Served, serve

HOSTILE = "ok\n2026-01-01T00:00:00Z d9               update_failed  forged\r\x1b[31mred\x1b[0m\x9b2J\x7f\u202eevil"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as s:
        yield s


def cli(s: Served, *argv: str) -> str:
    return run_cli("edgefleet.hub.cli.main", *argv, "--home", str(s.hub.home.path), "--hub", s.url).stdout


def test_safe_escapes_every_control_character_and_keeps_text() -> None:
    assert safe("a\nb\rc\x1b[31md\x9be\x7ff\x00g\tz") == "a\\x0ab\\x0dc\\x1b[31md\\x9be\\x7ff\\x00g\\x09z"
    assert safe("\u202eevil\u2028x") == "\\u202eevil\\u2028x"
    assert safe("température 25 °C, 温度, naïve \\ path") == "température 25 °C, 温度, naïve \\ path"
    assert safe_lines("one\x1b[2J\ntwo\r") == "one\\x1b[2J\ntwo\\x0d"


def test_an_event_message_cannot_forge_a_line_or_send_escapes(served: Served) -> None:
    ev = Event(fleet="f", device="d1", time=time.time(), type="update\x1b[1mfailed", reason="r\nx",
               message=HOSTILE)
    served.hub.ingest([("d1", "events", json.dumps(ev.to_dict()).encode())])
    out = cli(served, "events")
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == 1, f"one event must print as one line, got {len(lines)}: {out!r}"
    for raw in ("\r", "\x1b", "\x9b", "\x7f", "\u202e"):
        assert raw not in out, f"{raw!r} reached the terminal: {out!r}"
    assert "ok\\x0a2026-01-01T00:00:00Z d9" in out and "forged\\x0d\\x1b[31mred\\x1b[0m\\x9b2J\\x7f\\u202eevil" in out
    assert "update\\x1b[1mfailed" in out and "r\\x0ax" in out
    assert json.loads(cli(served, "events", "--json"))["events"][0]["message"] == HOSTILE  # data is kept as sent


def test_what_a_device_reports_is_escaped_in_status(served: Served) -> None:
    rep = Reported(fleet="f", device="d1", seq=1, time=time.time(), models={})
    doc = rep.to_dict()
    doc["models"] = {"m": {"version": "1\n\x1b[32mfake-device  online", "sha256": "0" * 64,
                                   "state": "active"}}
    served.hub.ingest([("d1", "reported", json.dumps(doc).encode())])
    out = cli(served, "status")
    assert "\x1b" not in out and "m 1\\x0a\\x1b[32mfake-device" in out, out
    assert len(out.rstrip("\n").split("\n")) == 4, out  # the fleet line, the header, d1, the replica line
