"""The systemd notify client, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.adapters.sdnotify import Notifier
from edgefleet.agent.app.daemon import Agent
from edgefleet.agent.contract.envelope import public_key_to_b64
from tests.conftest import REPO
from tests.simulator import in_process_agent_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    folder = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # AF_UNIX paths must stay short
    path = os.path.join(folder, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


def drain(sock: socket.socket) -> list[str]:
    out = []
    sock.settimeout(0.05)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except TimeoutError:
        return out


def test_ready_status_and_stopping_are_sent_as_datagrams(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    n = Notifier(env={"NOTIFY_SOCKET": path})
    n("READY=1\nSTATUS=clf 1.0.0")
    n("STOPPING=1")
    assert drain(sock) == ["READY=1\nSTATUS=clf 1.0.0", "STOPPING=1"]


def test_watchdog_is_paced_to_half_of_watchdog_usec(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    clock = FakeClock()
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=clock)
    assert n.watchdog_interval == 1.0
    sent_at = []
    for t in (0.0, 0.3, 0.9, 1.0, 1.5, 2.2, 2.3):
        clock.now = 100.0 + t
        before = len(drain(sock))
        n("WATCHDOG=1")
        if len(drain(sock)) + before:
            sent_at.append(t)
    assert sent_at == [0.0, 1.0, 2.2]


@pytest.mark.parametrize(
    "env", [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}]
)
def test_no_watchdog_pings_when_systemd_watches_nothing_or_another_process(
    listener: tuple[str, socket.socket], env: dict[str, str]
) -> None:
    path, sock = listener
    n = Notifier(env={"NOTIFY_SOCKET": path, **env})
    n("WATCHDOG=1")
    n("STATUS=still here")
    assert drain(sock) == ["STATUS=still here"]


def test_abstract_namespace_socket_and_no_socket_at_all() -> None:
    name = f"edgefleet-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        Notifier(env={"NOTIFY_SOCKET": "@" + name})("READY=1")
        assert drain(sock) == ["READY=1"]
    finally:
        sock.close()
    Notifier(env={})("READY=1")  # not under systemd: a silent no-op


def test_unit_files_exist_with_notify_and_watchdog() -> None:
    deploy = REPO / "deploy"
    for unit in ("edgefleet-agent.service", "edgefleet-hub.service"):
        text = (deploy / unit).read_text()
        for directive in (
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "StateDirectory=",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "ProtectHome=yes",
        ):
            assert directive in text, f"{unit} lacks {directive}"


def test_agent_stops_watchdog_pings_when_its_inference_server_dies(
    listener: tuple[str, socket.socket], tmp_path: Path
) -> None:
    """READY once serving, WATCHDOG while healthy; when the inference endpoint is gone the
    pings stop, so systemd's WatchdogSec restarts the agent."""
    path, sock = listener
    root = public_key_to_b64(Ed25519PrivateKey.generate().public_key())
    notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    agent = Agent(in_process_agent_config(tmp_path, root), notify=notifier)
    agent.start()
    try:
        sock.settimeout(10)
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=no model installed"
        assert [sock.recv(4096).decode() for _ in range(3)] == ["WATCHDOG=1"] * 3
        assert agent.http is not None
        agent.http.stop()
        drain(sock)
        sock.settimeout(0.5)  # ten watchdog intervals
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    finally:
        agent.stop()
    assert drain(sock) == ["STOPPING=1"]


def test_a_slow_download_that_progresses_keeps_the_watchdog_fed(
    listener: tuple[str, socket.socket], tmp_path: Path
) -> None:
    """The main loop is busy for the whole download; the heartbeat thread pings while bytes keep
    arriving, so systemd does not kill a healthy agent at WatchdogSec (half of it here: 0.2 s)."""
    from tests.simulator import simulator, tiny_model

    path, sock = listener
    with simulator() as sim:
        notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        agent = Agent(in_process_agent_config(tmp_path, sim.provisioned_root, fleet=sim.fleet, device=sim.device),
                      notify=notifier)
        agent.start()
        try:
            sock.settimeout(10)
            assert sock.recv(4096).decode().startswith("READY=1")
            data = tiny_model(2.0)  # ~200 bytes dripped 16 at a time every 0.15 s: about 2 s
            entry = sim.entry("2", data, mode="drip", drip_delay=0.15)
            agent._inbox.put(("keyring", sim.keyring()))
            agent._inbox.put(("desired", sim.desired({"m": entry})))
            sock.settimeout(2.0)
            pings: list[float] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "m" not in agent.models.models():
                with contextlib.suppress(TimeoutError):
                    if sock.recv(4096) == b"WATCHDOG=1":
                        pings.append(time.monotonic())
            assert "m" in agent.models.models(), "the model was not installed"
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert len(pings) >= 5 and max(gaps) < 0.6, f"watchdog gaps during the download: {gaps}"
        finally:
            agent.stop()
