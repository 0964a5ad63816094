"""Simulated fleets over several processes: one :class:`~agent.app.sim.SimFleet` per process.

One process holds one GIL: past a few thousand agents the simulator, not the hub, sets the pace
(each update costs an agent ~1.3 ms of Python and ~1 ms of fsyncs, measured). :class:`SimProcs`
splits the devices over ``procs`` child processes (``python -m bench.simproc``), each an epoll
loop over its share of real MQTT connections running the real update core, and aggregates what
they report: connected agents, agents holding the keyring, agents per active version, windows
sent, refusals, blob downloads.

Child protocol: the device ids come in a file; every change of its counts is a JSON line on
stdout (checked every 10 ms); stdin takes ``telemetry SECONDS``, ``telemetry off``, ``clock
OFFSET`` (every agent's clock runs OFFSET seconds off the real one from then on; ``clock 0``
heals it) and ``stop``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from bench.common import REPO

__all__ = ["SimProcs"]


class SimProcs:
    """``procs`` simulator children for ``devices``; ``start`` spawns them, :meth:`wait` waits on
    what they report."""

    def __init__(self, devices: list[str], *, fleet: str, broker_url: str, root_public_key: str,
                 state_dir: Path, procs: int = 2) -> None:
        self.n = len(devices)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._reports: list[dict[str, Any]] = [{} for _ in range(procs)]
        self._gen = 0  # bumped on every report
        self._children: list[subprocess.Popen[str]] = []
        self._readers: list[threading.Thread] = []
        self._args = (fleet, broker_url, root_public_key)
        self._shares = [devices[i::procs] for i in range(procs)]
        self._state_dir = state_dir

    def start(self) -> None:
        fleet, url, root = self._args
        for i, share in enumerate(self._shares):
            d = self._state_dir / f"proc{i}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "devices.txt").write_text("\n".join(share))
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.simproc", "--fleet", fleet, "--broker", url, "--root", root,
                 "--dir", str(d)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self._children.append(child)
            assert child.stdout is not None
            t = threading.Thread(target=self._read, args=(i, child.stdout), daemon=True, name=f"simproc-{i}")
            t.start()
            self._readers.append(t)

    def _read(self, i: int, out: IO[str]) -> None:
        for line in out:
            with self._changed:
                self._reports[i] = json.loads(line)
                self._gen += 1
                self._changed.notify_all()

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children]

    def total(self, key: str) -> int:
        with self._lock:
            return sum(int(r.get(key, 0)) for r in self._reports)

    def on_version(self, version: str) -> int:
        with self._lock:
            return sum(int(r.get("versions", {}).get(version, 0)) for r in self._reports)

    def refusal_samples(self) -> list[str]:
        with self._lock:
            return [x for r in self._reports for x in r.get("refusal_samples", [])]

    def wait(self, pred: Callable[[SimProcs], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                gen = self._gen
            if pred(self):
                return
            left = deadline - time.monotonic()
            dead = [c.returncode for c in self._children if c.poll() is not None]
            if left <= 0 or dead:
                raise TimeoutError(f"{what}: not reached in {timeout:.0f}s"
                                   + (f" (simulator exited {dead})" if dead else ""))
            with self._changed:
                if self._gen == gen:  # nothing new since pred looked
                    self._changed.wait(min(left, 0.5))

    def command(self, line: str) -> None:
        for c in self._children:
            assert c.stdin is not None
            c.stdin.write(line + "\n")
            c.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.command("stop")
        for c in self._children:
            try:
                c.wait(60)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()


def _child(fleet: str, broker: str, root: str, workdir: Path) -> None:
    from bench.common import raise_nofile
    from edgefleet.agent.app.sim import BlobCache, SimAgent, SimFleet

    devices = [d for d in (workdir / "devices.txt").read_text().split("\n") if d]
    raise_nofile(len(devices) + 1024)
    cache = BlobCache(workdir / "cache")
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    agents = [SimAgent(fleet=fleet, device=d, root_public_key=root, state_dir=workdir / "agents" / d, cache=cache,
                       clock=clock) for d in devices]
    lock = threading.Lock()
    versions: Counter[str] = Counter()
    current: dict[str, str] = {}
    keyed: set[str] = set()
    refused: dict[str, int] = {}
    samples: list[str] = []

    def changed(a: SimAgent) -> None:  # on a worker, after each message an agent handled
        e = a.active.get("clf")
        v = e.version if e is not None else ""
        with lock:
            old = current.get(a.device)
            if old != v:
                if old:
                    versions[old] -= 1
                if v:
                    versions[v] += 1
                current[a.device] = v
            if a.trust.keyring is not None:
                keyed.add(a.device)
            if a.refusals and refused.get(a.device) != len(a.refusals):
                refused[a.device] = len(a.refusals)
                if len(samples) < 3:
                    samples.append(f"{a.device}: {a.refusals[-1]}")

    for a in agents:
        a.on_change = changed
    sim = SimFleet(agents, broker, workers=16)
    sim.start()
    # Thousands of agents are millions of long-lived objects: left in the collector's oldest
    # generation, each full collection walks them all, and the updates' allocations trigger one
    # every few hundred agents (superlinear in the fleet). Frozen, as the hub does at start.
    gc.collect()
    gc.freeze()
    stop = threading.Event()

    def report() -> None:
        last, windows, counted, unacked, dropped = "", 0, 0.0, 0, 0
        while not stop.is_set():
            now = time.monotonic()
            if now - counted >= 0.25:  # a walk over every agent: not at every tick
                windows, counted = sum(a.windows_sent for a in agents), now
                unacked, dropped = sum(len(a.unacked) for a in agents), sum(a.dropped for a in agents)
            with lock:
                line = json.dumps({
                    "connected": sim.connected, "keyring": len(keyed),
                    "versions": {k: n for k, n in versions.items() if n}, "windows": windows,
                    "refused": sum(refused.values()), "refusal_samples": samples, "downloads": cache.downloads,
                    "unacked": unacked, "dropped": dropped, "reconnects": sim.reconnects,
                }, sort_keys=True)
            if line != last:
                print(line, flush=True)
                last = line
            stop.wait(0.01)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    for cmd in sys.stdin:
        words = cmd.split()
        if words[:1] == ["telemetry"]:
            sim.start_telemetry(None if words[1] == "off" else float(words[1]))
        elif words[:1] == ["clock"]:
            offset[0] = float(words[1])
        elif words[:1] == ["stop"]:
            break
    sim.stop(drain=5.0)
    time.sleep(0.3)  # the last counts, windows included
    stop.set()
    reporter.join(2)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    a = ap.parse_args()
    _child(a.fleet, a.broker, a.root, a.dir)
