"""A chaos soak: a real fleet under continuous rollouts while faults are injected at random.

    python -m bench.soak [--seconds 600] [--seed N] [--json FILE] [--markdown FILE]

One Mosquitto (persistence on), one hub process, three agent processes and ``--sims`` simulated
agents (one SimFleet child process: the real trust and update core, no ONNX sessions) on this
machine; each agent reaches the broker through its own TCP proxy owned by the soak (so its network
can be cut), the simulated ones through one more,
and every blob download goes through a mirror proxy in front of the hub (the hub's ``public_url``),
which can be made slow or made to corrupt bytes. The soak drives live OIP inference on every agent
and runs rollouts back to back — good candidates (same graph re-published, retrained) and bad ones
(NaN or crash on ~5 % of inputs, bench.canary_matrix.booby_trapped), in shadow and split mode,
deploys a promoted version to the simulated agents every 10-20 s — while a fault injector, from
the printed seed, picks one fault at a time:

broker_kill    kill -9 the broker, restart it on the same port and persistence file
hub_kill       kill -9 the hub, restart it on the same home
agent_kill     kill -9 one agent (at whatever update step it is in), restart it
net_drop       the agent's proxy closes its connections and refuses new ones
net_stall      the agent's proxy stops forwarding bytes (connections stay open: keepalive finds it)
mirror_slow    the blob mirror sends 64 KiB/s
mirror_corrupt the blob mirror flips one byte of every response body
disk_full      one agent's state folder (a size-limited tmpfs, when the soak runs as root) is filled
sims_net_drop  the simulated agents' proxy closes their connections and refuses new ones
clock_jump     the simulated agents' clocks jump by an hour to 40 days, forward or back, then heal

After each fault is healed the soak waits for recovery: the hub answers, every agent is online and
runs what its desired state names. Then the invariants, each a line of the report:

signed_only    every (version, sha256) an agent reported serving was in a desired state the hub signed
               for that device (checked with the device's own trust rules: root, keyring, signatures)
converged      every agent, real and simulated, ends on the version its last desired state names
telemetry      for each agent, the window seqs the hub stored are 1..last, none missing that the
               spool did not drop and count, none left unacknowledged, and the drift sums
               (telemetry_agg) never hold more windows or requests per device, model and version
               than are stored (none counted twice)
audit          the audit chain verifies, and every rollout's final decision is in it exactly once
no_leaks       RSS and thread count of each process that lived through the run, at its start and end
recovery       every fault was followed by recovery within ``--recovery-limit`` seconds

The run is deterministic in what it injects, when, and which rollouts it starts (seeded); what the
system does in between is timing. A failing seed is a bug: fix it and add the seed to the CI test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import psutil

from bench.canary_matrix import AGENT, GOOD, HUB, Models, booby_trapped, request_load
from bench.common import REPO, free_port, relabelled, wait_until
from bench.simproc import SimProcs
from edgefleet.agent.contract.envelope import public_key_from_b64
from edgefleet.agent.contract.errors import EdgefleetError, StaleSequence
from edgefleet.agent.contract.wire import Reported, Topics
from edgefleet.agent.core.trust import NoKeyring, TrustedState

DEVICES = ("dev-a", "dev-b", "dev-c")
FAULTS = ("broker_kill", "hub_kill", "agent_kill", "net_drop", "net_stall", "mirror_slow", "mirror_corrupt",
          "disk_full", "sims_net_drop", "clock_jump")
# seconds; 40 days is past a desired state's expiry (desired_ttl_seconds: 30 days by default)
CLOCK_JUMPS = (3600.0, 3 * 86400.0, 40 * 86400.0, -600.0, -3600.0, -86400.0)
CANDIDATES = ("identical", "retrained", "nan", "crash")
DISK_DEVICE = "dev-c"


# -- a proxy the soak owns -------------------------------------------------------------------------


class Proxy:
    """A TCP proxy on a free loopback port to ``target_port``, in its own asyncio thread.

    Modes: ``pass``; ``drop`` (close every connection, accept-and-close new ones); ``stall``
    (forward nothing, keep connections open); ``slow`` (server-to-client at ``SLOW_BPS``);
    ``corrupt`` (flip one byte of each server-to-client stream past its first ``CORRUPT_AT`` bytes:
    in an HTTP response, a byte of the body)."""

    SLOW_BPS = 64 * 1024
    CORRUPT_AT = 2048

    def __init__(self, target_port: int, name: str) -> None:
        self.target_port, self.name = target_port, name
        self.port = free_port()
        self.mode = "pass"
        self.corrupted = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"proxy-{name}", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._changed = asyncio.Event()
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    def set_mode(self, mode: str) -> None:
        def apply() -> None:
            self.mode = mode
            assert self._changed is not None
            self._changed.set()
            self._changed = asyncio.Event()
            if mode == "drop":
                for w in list(self._writers):
                    w.transport.abort()
        self._loop.call_soon_threadsafe(apply)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "drop":
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_w}
        try:
            await asyncio.gather(self._pump(reader, up_w, down=False), self._pump(up_r, writer, down=True))
        finally:
            for w in (writer, up_w):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, down: bool) -> None:
        sent, flipped = 0, False
        try:
            while True:
                data = await r.read(4096 if self.mode == "slow" else 65536)
                if not data:
                    break
                while self.mode == "stall":
                    assert self._changed is not None
                    await self._changed.wait()
                if self.mode == "drop":
                    break
                if down and self.mode == "corrupt" and not flipped and sent + len(data) > self.CORRUPT_AT:
                    i = max(0, self.CORRUPT_AT - sent)
                    data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
                    flipped = True
                    self.corrupted += 1
                w.write(data)
                await w.drain()
                sent += len(data)
                if down and self.mode == "slow":
                    await asyncio.sleep(len(data) / self.SLOW_BPS)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.transport.abort()

    def close(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)
        self._loop.close()


# -- the broker, with persistence ------------------------------------------------------------------


class Broker:
    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {work}/\nautosave_interval 5\nmax_queued_messages 100000\n"
            "max_inflight_messages 100\nlog_type error\n")
        self.log = work / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: _port_open(self.port), 15, f"mosquitto on {self.port}", 0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# -- what the devices were signed for, and what they said they serve -------------------------------


class Monitor:
    """Subscribes (directly on the broker) to the keyring, every device's desired state and
    reported state. Each desired state goes through the device's own
    :class:`~agent.core.trust.TrustedState` (root, keyring, signature, fleet, device); the
    (version, sha256) pairs of the ones that verify are what that device may serve."""

    def __init__(self, fleet: str, broker_port: int, root_public_key: str, devices: list[str]) -> None:
        self.topics = Topics(fleet)
        self.lock = threading.Lock()
        self.trust = {d: TrustedState(root=public_key_from_b64(root_public_key), fleet=fleet, device=d)
                      for d in devices}
        self.signed: dict[str, set[tuple[str, str]]] = {d: set() for d in devices}
        self.last_desired: dict[str, dict[str, str]] = {}  # device -> model -> version of its newest state
        self.reported: dict[str, dict[str, tuple[str, str]]] = {}
        self.unsigned_seen: list[str] = []  # reported pairs not (yet) signed when seen
        self.unverifiable = 0
        self.stale = 0  # older desired states seen after a newer one (replay protection refused them)
        self.pending: dict[str, bytes] = {}
        self.desired_count: dict[str, int] = {}  # new desired states seen per device
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-monitor", clean_session=True)  # type: ignore[attr-defined]
        c.reconnect_delay_set(0.2, 2)
        c.on_connect = lambda cl, *_a: cl.subscribe(
            [(self.topics.keyring, 1), (f"{self.topics.root}devices/+/desired", 1),
             (f"{self.topics.root}devices/+/reported", 1)])
        c.on_message = self._on_message
        c.connect_async("127.0.0.1", broker_port, keepalive=10)
        c.loop_start()
        self.client = c

    def _on_message(self, _c: object, _u: object, msg: Any) -> None:
        if not msg.payload:
            return
        with self.lock:
            try:
                self._take(msg.topic, bytes(msg.payload))
            except Exception as exc:  # a monitor bug must not pass silently
                self.unsigned_seen.append(f"monitor error on {msg.topic}: {exc!r}")

    def _take(self, topic: str, payload: bytes) -> None:
        now = time.time()
        if topic == self.topics.keyring:
            for t in self.trust.values():
                with contextlib.suppress(EdgefleetError):
                    t.update_keyring(payload, now=now)
            for device, raw in list(self.pending.items()):
                self._desired(device, raw)
            return
        parts = topic.split("/")
        device, channel = parts[-2], parts[-1]
        if device not in self.trust:
            return
        if channel == "desired":
            try:
                self._desired(device, payload)
            except NoKeyring:
                self.pending[device] = payload
            except StaleSequence:  # an older state redelivered (retained, re-published): refused by
                self.stale += 1    # design, as a device refuses it; counted, not a signing failure
            except EdgefleetError:
                self.unverifiable += 1
        elif channel == "reported":
            rep = Reported.from_dict(json.loads(payload))
            pairs = {m: (r.version, r.sha256) for m, r in rep.models.items()}
            self.reported[device] = pairs
            for m, pair in pairs.items():
                if pair not in self.signed[device]:
                    self.unsigned_seen.append(f"{device} {m} {pair[0]} {pair[1][:12]}")

    def _desired(self, device: str, raw: bytes) -> None:
        v = self.trust[device].check_desired(raw, now=time.time())
        self.pending.pop(device, None)
        if v is None:
            return
        self.trust[device].mark_applied(v)
        for e in v.state.models.values():  # each entry, and the candidate inside a canary entry
            self.signed[device] |= {(e.version, e.sha256), *_pairs(e.canary or {})}
        self.last_desired[device] = {m: e.version for m, e in v.state.models.items()}
        self.desired_count[device] = self.desired_count.get(device, 0) + 1

    def violations(self) -> list[str]:
        """Reported pairs never signed for their device, by the end of the run."""
        with self.lock:
            out = []
            for s in self.unsigned_seen:
                if s.startswith("monitor error"):
                    out.append(s)
                    continue
                device, _m, version, short = s.split()
                if not any(v == version and h.startswith(short) for v, h in self.signed[device]):
                    out.append(s)
            return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _pairs(obj: Any) -> list[tuple[str, str]]:
    """Every (version, sha256) pair anywhere in ``obj`` (a canary entry's candidate and stable)."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        if isinstance(obj.get("version"), str) and isinstance(obj.get("sha256"), str):
            out.append((obj["version"], obj["sha256"]))
        for v in obj.values():
            out += _pairs(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _pairs(v)
    return out


# -- the fleet --------------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    target: str
    at: float
    held: float
    recovery: float | None = None
    note: str = ""


@dataclass
class Report:
    seed: int
    seconds: float
    faults: list[FaultRecord] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    invariants: dict[str, tuple[bool, str]] = field(default_factory=dict)
    served: int = 0
    failed: int = 0
    skipped: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, work: Path, seed: int, *, recovery_limit: float, sims: int = 0) -> None:
        self.work, self.seed = work, seed
        # two streams, one per thread: the faults and the rollouts each follow the seed alone
        self.rng = random.Random(seed)
        self.roll_rng = random.Random(seed + 1_000_003)
        self.models = Models(seed=7)
        self.recovery_limit = recovery_limit
        self.home = work / "hub"
        self.broker = Broker(work / "broker")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.proxies: dict[str, Proxy] = {}
        self.ports: dict[str, int] = {}
        self.stop_event = threading.Event()
        self.served = self.failed = 0
        self.samples: dict[str, list[tuple[int, float, int]]] = {}  # name -> (pid, rss MB, threads) per sample
        self.tmpfs: Path | None = None
        self.sim_ids = [f"sim{i:04d}" for i in range(sims)]
        self.sims: SimProcs | None = None
        self.sims_proxy: Proxy | None = None
        self.sim_deploys_done = 0
        self.good_versions = ["1"]  # what the sims are deployed, at random, while the soak runs
        self.skipped: list[str] = []

    # -- processes --

    def hub(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*HUB, *args, "--home", str(self.home)], cwd=REPO, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"edgefleet-hub {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
        return r

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.work / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def start_hub(self) -> None:
        self._spawn("hub", [*HUB, "serve", "--home", str(self.home)])
        wait_until(self._hub_up, 60, "hub API", 0.2)

    def start_agent(self, dev: str) -> None:
        self._spawn(dev, [*AGENT, "run", "--config", str(self.work / dev / "agent.toml")])

    def _hub_up(self) -> bool:
        try:
            return self.api.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        self.broker.start()
        self.api_port = free_port()
        self.mirror = Proxy(self.api_port, "mirror")
        subprocess.run([*HUB, "init", "--home", str(self.home), "--fleet", "soak", "--broker", self.broker.url,
                        "--http", f"127.0.0.1:{self.api_port}", "--public-url", f"http://127.0.0.1:{self.mirror.port}"],
                       cwd=REPO, check=True, capture_output=True)
        (self.home / "rollout.toml").write_text("evaluate_seconds = 0.3\n[policy]\nstep_deadline_seconds = 45\n")
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30, headers={
            "Authorization": f"Bearer {(self.home / 'admin.token').read_text().strip()}"})
        self.start_hub()
        for dev in DEVICES:
            out = self.work / dev
            if dev == DISK_DEVICE:
                self._mount_small(out)
            proxy = Proxy(self.broker.port, dev)
            self.proxies[dev] = proxy
            port = free_port()
            self.ports[dev] = port
            self.hub("device", "add", dev, "--out", str(out), "--listen", f"127.0.0.1:{port}", "--window", "0.5")
            conf = out / "agent.toml"
            conf.write_text(conf.read_text().replace(self.broker.url, f"mqtt://127.0.0.1:{proxy.port}"))
            self.start_agent(dev)
        self.root = (self.work / DEVICES[0] / "root.pub").read_text().strip()
        self.monitor = Monitor("soak", self.broker.port, self.root, [*DEVICES, *self.sim_ids])
        if self.sim_ids:
            from edgefleet.hub.adapters.client import HubClient
            from edgefleet.hub.adapters.home import HubHome

            self.client = HubClient(f"http://127.0.0.1:{self.api_port}", HubHome(self.home).token(), timeout=300)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda d: self.client.add_device(d, "generic-x86_64"), self.sim_ids))
            self.sims_proxy = Proxy(self.broker.port, "sims")
            self.sims = SimProcs(self.sim_ids, fleet="soak", broker_url=f"mqtt://127.0.0.1:{self.sims_proxy.port}",
                                 root_public_key=self.root, state_dir=self.work / "sims", procs=1)
            self.sims.start()
            self.sims.wait(lambda x: x.total("keyring") == len(self.sim_ids), 120, "the keyring on every sim")
            self.sims.command("telemetry 5")

    def _mount_small(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.skipped.append("disk_full: needs root to mount a size-limited tmpfs; not injected")
            return
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            self.skipped.append(f"disk_full: mount tmpfs failed ({r.stderr.strip()}); not injected")
            return
        self.tmpfs = path

    def stop(self) -> None:
        self.stop_event.set()
        with contextlib.suppress(Exception):
            self.monitor.close()
        if self.sims is not None:
            with contextlib.suppress(Exception):
                self.sims.stop()
        for name in [*DEVICES, "hub"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.broker.stop()
        for proxy in [*self.proxies.values(), self.mirror, *([self.sims_proxy] if self.sims_proxy else [])]:
            proxy.close()
        if self.tmpfs is not None:
            subprocess.run(["umount", "-l", str(self.tmpfs)], capture_output=True)

    # -- load and sampling --

    def load(self, dev: str) -> None:
        request_load(self.ports[dev], lambda: self.models.live, 40.0, self.stop_event, self._tally)

    def _tally(self, ok: bool) -> None:
        if ok:
            self.served += 1
        else:
            self.failed += 1

    def sample(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items()}
        if self.sims is not None:
            pids |= {f"sims{i}": pid for i, pid in enumerate(self.sims.pids)}
        for name, pid in pids.items():
            try:
                ps = psutil.Process(pid)
                self.samples.setdefault(name, []).append((pid, ps.memory_info().rss / 2**20, ps.num_threads()))
            except psutil.Error:
                pass

    # -- rollouts --

    def rollouts(self, out: list[dict[str, Any]]) -> None:
        stable = ("1", self.stable_bytes)
        n = 1
        while not self.stop_event.is_set():
            n += 1
            kind = self.roll_rng.choice(CANDIDATES)
            mode = self.roll_rng.choice(("shadow", "split"))
            version = str(n)
            data = (relabelled(stable[1], f"again {version}") if kind == "identical" else
                    self.models.forest(resample=True) if kind == "retrained" else
                    booby_trapped(stable[1], kind, self.models.trigger, version))
            rec: dict[str, Any] = {"version": version, "candidate": kind, "mode": mode}
            try:
                self._publish(version, data)
                rid = self._retry(lambda: self.api.post("/api/v1/rollouts", json={
                    "model": "clf", "version": version, "steps": [50, 100], "mode": mode, "fraction": 0.5,
                    "devices": list(DEVICES)}))
                rec["id"] = rid.json()["id"]
                t0, state = time.monotonic(), "running"
                while time.monotonic() - t0 < 120 and not self.stop_event.is_set():
                    view = self._retry(lambda: self.api.get("/api/v1/rollouts", params={"id": rec["id"]}))
                    state = view.json()["rollouts"][0]["state"]
                    rec["reason"] = str(view.json()["rollouts"][0].get("reason") or "")[:300]
                    if state != "running":
                        break
                    time.sleep(0.5)
                if state in ("running", "paused"):
                    r = self._retry(lambda: self.api.post("/api/v1/rollouts/action",
                                                          json={"action": "abort", "rollout": rec["id"]}), ok=(400,))
                    if r.status_code == 400:  # it was decided meanwhile: what was decided stands
                        view = self._retry(lambda: self.api.get("/api/v1/rollouts", params={"id": rec["id"]}))
                        state = view.json()["rollouts"][0]["state"]
                    else:
                        rec["aborted_from"] = state
                        state = "aborted"
                rec["state"] = state
                rec["seconds"] = round(time.monotonic() - t0, 1)
                if state == "promoted":
                    stable = (version, data)
                    self.good_versions.append(version)
            except Exception as exc:  # recorded; the soak goes on
                body = exc.response.text[:300] if isinstance(exc, httpx.HTTPStatusError) else ""
                rec["error"] = f"{type(exc).__name__}: {exc} {body}"[:600]
                time.sleep(1)
            out.append(rec)
            print(f"  rollout {version} {kind:9} {mode:6} -> {rec.get('state', rec.get('error'))}"
                  f"{' (' + rec['aborted_from'] + ')' if 'aborted_from' in rec else ''}"
                  f"{': ' + rec['reason'][:160] if rec.get('state') == 'rolled_back' and kind in GOOD else ''}",
                  flush=True)

    def sim_deploys(self) -> None:
        """The simulated agents' share of the churn: every 10-20 s, all of them are deployed a
        version drawn from the ones promoted so far (their own rng stream)."""
        rng = random.Random(self.seed + 2_000_003)
        while not self.stop_event.wait(rng.uniform(10, 20)):
            version = rng.choice(self.good_versions)
            with contextlib.suppress(Exception):
                self.client.deploy("clf", version, self.sim_ids)
                self.sim_deploys_done += 1

    def _publish(self, version: str, data: bytes) -> None:
        path = self.work / f"clf-{version}.onnx"
        path.write_bytes(data)
        for attempt in range(20):
            r = self.hub("publish", str(path), "--name", "clf", "--version", version, "--reference",
                         str(self.work / "reference.npy"), check=False)
            if r.returncode == 0:
                return
            time.sleep(1 + attempt)
        raise RuntimeError(f"publish {version} failed: {r.stderr.strip()[-300:]}")

    def _retry(self, call: Any, timeout: float = 90, ok: tuple[int, ...] = ()) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = call()
                if r.status_code in ok:
                    return r  # type: ignore[no-any-return]
                if r.status_code < 500:
                    r.raise_for_status()
                    return r  # type: ignore[no-any-return]
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError("hub API kept failing")
            time.sleep(0.5)

    # -- faults --

    def inject(self, kind: str, held: float) -> FaultRecord:
        target = ""
        if kind == "broker_kill":
            target = "broker"
            self.broker.kill()
            time.sleep(held)
            self.broker.start()
        elif kind == "hub_kill":
            target = "hub"
            self.procs["hub"].kill()
            self.procs["hub"].wait()
            time.sleep(held)
            self.start_hub()
        elif kind == "agent_kill":
            target = self.rng.choice(DEVICES)
            if self.rng.random() < 0.5:  # in the middle of an update: soon after a new desired state
                before = self.monitor.desired_count.get(target, 0)
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: self.monitor.desired_count.get(target, 0) > before, 30, "a desired state", 0.05)
                time.sleep(self.rng.uniform(0, 1.5))
                target += " (updating)"
            self.procs[target.split()[0]].kill()
            self.procs[target.split()[0]].wait()
            time.sleep(held)
            self.start_agent(target.split()[0])
        elif kind in ("net_drop", "net_stall"):
            target = self.rng.choice(DEVICES)
            self.proxies[target].set_mode(kind[4:])
            time.sleep(held)
            self.proxies[target].set_mode("pass")
        elif kind in ("mirror_slow", "mirror_corrupt"):
            target = "mirror"
            self.mirror.set_mode(kind[7:])
            time.sleep(held)
            self.mirror.set_mode("pass")
        elif kind == "sims_net_drop":
            target = "sims"
            assert self.sims_proxy is not None
            self.sims_proxy.set_mode("drop")
            time.sleep(held)
            self.sims_proxy.set_mode("pass")
        elif kind == "clock_jump":
            assert self.sims is not None
            jump = self.rng.choice(CLOCK_JUMPS)
            target = f"sims {jump:+.0f} s"
            self.sims.command(f"clock {jump}")
            time.sleep(held)
            self.sims.command("clock 0")
        elif kind == "disk_full":
            target = DISK_DEVICE
            assert self.tmpfs is not None
            filler = self.tmpfs / "filler"
            with filler.open("wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            time.sleep(held)
            filler.unlink()
        return FaultRecord(kind=kind, target=target, at=0.0, held=round(held, 1))

    def healthy(self) -> bool:
        """The hub answers, every agent is online and reports what its newest desired state names,
        as seen through fresh connections (the monitor's, the simulated agents')."""
        if not self.monitor.client.is_connected():
            return False
        if self.sims is not None and self.sims.total("connected") < len(self.sim_ids):
            return False
        try:
            devices = self.api.get("/api/v1/status", timeout=5).json()["devices"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        online = {d["device"] for d in devices if "online" in (d.get("status"), d.get("state"))}
        if set(DEVICES) - online or set(self.sim_ids) - online:
            return False
        with self.monitor.lock:
            for dev in [*DEVICES, *self.sim_ids]:
                want = self.monitor.last_desired.get(dev, {}).get("clf")
                have = self.monitor.reported.get(dev, {}).get("clf", ("", ""))[0]
                if want is None or want != have:
                    return False
        return True

    def faults(self, until: float, records: list[FaultRecord]) -> None:
        kinds = [k for k in FAULTS if not (k == "disk_full" and self.tmpfs is None)
                 and not (k in ("sims_net_drop", "clock_jump") and self.sims is None)]
        t0 = time.monotonic()
        while time.monotonic() < until and not self.stop_event.is_set():
            time.sleep(self.rng.uniform(4, 10))
            if time.monotonic() >= until:
                break
            kind = self.rng.choice(kinds)
            held = self.rng.uniform(1, 4) if kind.endswith("kill") else self.rng.uniform(4, 12)
            at = time.monotonic() - t0
            print(f"  fault at {at:6.1f}s: {kind} for {held:.1f}s", flush=True)
            rec = self.inject(kind, held)
            rec.at = round(at, 1)
            healed = time.monotonic()
            try:
                wait_until(self.healthy, self.recovery_limit, "recovery", 0.25)
                rec.recovery = round(time.monotonic() - healed, 1)
            except TimeoutError:
                rec.note = "no recovery within the limit"
            print(f"    {rec.target}: recovered in {rec.recovery} s" if rec.recovery is not None
                  else f"    {rec.target}: NOT recovered in {self.recovery_limit:.0f} s", flush=True)
            records.append(rec)
            self.sample()

    # -- the run --

    def run(self, seconds: float) -> Report:
        report = Report(seed=self.seed, seconds=seconds)
        np.save(self.work / "reference.npy", self.models.reference)
        self.stable_bytes = self.models.forest()
        self.start()
        report.skipped = self.skipped
        self._publish("1", self.stable_bytes)
        self.hub("device", "list", check=False)
        self.hub("deploy", "clf", "1", *[a for d in DEVICES for a in ("--device", d)])
        if self.sim_ids:
            self.client.deploy("clf", "1", self.sim_ids)
        wait_until(self.healthy, 120, "every agent on clf 1", 0.3)
        loads = [threading.Thread(target=self.load, args=(d,), daemon=True) for d in DEVICES]
        for t in loads:
            t.start()
        time.sleep(3)
        self.sample()
        roll = threading.Thread(target=self.rollouts, args=(report.rollouts,), daemon=True)
        roll.start()
        churn = threading.Thread(target=self.sim_deploys, daemon=True)
        if self.sims is not None:
            churn.start()
        self.faults(time.monotonic() + seconds, report.faults)
        # wind down: the rollout in flight finishes (or is aborted), then everything settles
        self.stop_event.set()
        roll.join(150)
        if churn.is_alive():
            churn.join(60)
        for t in loads:
            t.join(10)
        report.served, report.failed = self.served, self.failed
        settled = True
        try:
            wait_until(self.healthy, 120, "the fleet settled", 0.3)
        except TimeoutError:
            settled = False
        self.sample()
        self.check(report, settled)
        return report

    # -- invariants --

    def check(self, report: Report, settled: bool) -> None:
        inv = report.invariants
        bad = self.monitor.violations()
        inv["signed_only"] = (not bad and self.monitor.unverifiable == 0,
                              f"{sum(len(s) for s in self.monitor.signed.values())} signed (device, version) pairs; "
                              f"{len(bad)} reported pairs never signed for their device"
                              f"{': ' + '; '.join(bad[:3]) if bad else ''}; {self.monitor.unverifiable} desired "
                              f"states that failed the device's checks; {self.monitor.stale} older states "
                              "redelivered after a newer one (refused as stale, as devices do)")
        with self.monitor.lock:
            ends = {d: (self.monitor.last_desired.get(d, {}).get("clf"),
                        self.monitor.reported.get(d, {}).get("clf", ("?", ""))[0]) for d in DEVICES}
            sim_off = [d for d in self.sim_ids if self.monitor.last_desired.get(d, {}).get("clf") !=
                       self.monitor.reported.get(d, {}).get("clf", ("?", ""))[0]]
        behind = self._retained_behind()
        inv["converged"] = (settled and all(w == h for w, h in ends.values()) and not sim_off and not behind,
                            ", ".join(f"{d} on {h} (desired {w})" for d, (w, h) in ends.items())
                            + (f"; the broker retains an older desired state than the hub's for {behind}" if behind
                               else "; the broker retains every device's newest desired state")
                            + (f"; {len(self.sim_ids) - len(sim_off)} of {len(self.sim_ids)} simulated agents on "
                               f"their desired version ({self.sim_deploys_done} deploys to them)" if self.sim_ids else "")
                            + (f", off: {', '.join(sim_off[:5])}" if sim_off else ""))
        inv["telemetry"] = self._telemetry()
        inv["audit"] = self._audit(report)
        inv["no_leaks"] = self._leaks()
        rec = [f for f in report.faults if f.recovery is not None]
        worst = max((f.recovery for f in rec), default=0.0)
        inv["recovery"] = (len(rec) == len(report.faults) and bool(report.faults),
                           f"{len(rec)} of {len(report.faults)} faults recovered within {self.recovery_limit:.0f} s; "
                           f"worst {worst:.1f} s")

    def _retained_behind(self) -> list[str]:
        """Devices whose retained desired state (what a device connecting now receives) is older
        than the one the hub stored; a few seconds for the hub to correct a stale copy."""
        db = sqlite3.connect(f"file:{self.home / 'hub.db'}?mode=ro", uri=True, timeout=30)
        try:
            stored = {r[0]: int(r[1]) for r in db.execute("SELECT device, seq FROM desired").fetchall()}
        finally:
            db.close()
        behind: list[str] = []
        for _ in range(10):
            seen: dict[str, int] = {}
            done = threading.Event()
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-retained-{time.monotonic_ns()}")  # type: ignore[attr-defined]

            def take(_c: object, _u: object, msg: Any, seen: dict[str, int] = seen) -> None:
                with contextlib.suppress(Exception):
                    body = json.loads(base64.b64decode(json.loads(msg.payload)["payload"]))
                    seen[msg.topic.split("/")[-2]] = int(body["seq"])

            c.on_message = take
            c.on_subscribe = lambda *_a: done.set()
            c.connect("127.0.0.1", self.broker.port)
            c.loop_start()
            c.subscribe(f"{self.monitor.topics.root}devices/+/desired", 0)
            done.wait(5)
            time.sleep(1.0)  # retained messages follow the SUBACK
            c.loop_stop()
            c.disconnect()
            behind = sorted(d for d, seq in stored.items() if seen.get(d, 0) < seq)
            if not behind:
                return []
            time.sleep(1.0)
        return behind

    def _telemetry(self) -> tuple[bool, str]:
        # every spooled window delivered first: the agents' spools drain once the hub has acked them
        def drained() -> bool:
            return (all(not any((self.work / d / "state" / "spool").glob("*.json")) for d in DEVICES)
                    and (self.sims is None or self.sims.total("unacked") == 0))

        with contextlib.suppress(TimeoutError):
            wait_until(drained, 90, "spools drained", 0.5)
        left = {d: len(list((self.work / d / "state" / "spool").glob("*.json"))) for d in DEVICES}
        db = sqlite3.connect(f"file:{self.home / 'hub.db'}?mode=ro", uri=True, timeout=30)
        problems, parts = [], []
        for d in DEVICES:
            seqs = [r[0] for r in db.execute("SELECT seq FROM telemetry WHERE device = ? ORDER BY seq", (d,))]
            last_sys = db.execute("SELECT system FROM telemetry WHERE device = ? ORDER BY seq DESC LIMIT 1",
                                  (d,)).fetchone()
            dropped = 0
            if last_sys:
                dropped = int(json.loads(last_sys[0]).get("spool", {}).get("dropped_total", 0))
            top = seqs[-1] if seqs else 0
            missing = top - len(set(seqs))
            parts.append(f"{d}: {len(seqs)} windows up to seq {top}, {missing} missing, {dropped} dropped by the "
                         f"spool, {left[d]} still spooled")
            if missing > dropped:
                problems.append(f"{d} lost {missing - dropped}")
            if left[d]:
                problems.append(f"{d} has {left[d]} windows the hub never acknowledged")
        if self.sim_ids:
            rows = dict(db.execute("SELECT device, COUNT(*) FROM telemetry WHERE device LIKE 'sim%' GROUP BY device"))
            tops = dict(db.execute("SELECT device, MAX(seq) FROM telemetry WHERE device LIKE 'sim%' GROUP BY device"))
            assert self.sims is not None
            missing = sum(tops[d] - rows[d] for d in rows)
            dropped, unacked = self.sims.total("dropped"), self.sims.total("unacked")
            sent = self.sims.total("windows")
            parts.append(f"{len(self.sim_ids)} simulated agents: {sum(rows.values())} windows stored of {sent} "
                         f"sent, {missing} missing below each one's last seq, {dropped} dropped unacknowledged, "
                         f"{unacked} still unacknowledged")
            if missing > dropped:
                problems.append(f"simulated agents lost {missing - dropped}")
            if sum(rows.values()) + dropped + unacked < sent:
                problems.append(f"simulated agents: {sent - sum(rows.values()) - dropped - unacked} windows sent "
                                "and neither stored nor accounted for")
            if unacked:
                problems.append(f"simulated agents hold {unacked} windows the hub never acknowledged")
        # Never counted twice: the drift sums (telemetry_agg) hold no more windows and requests per
        # device, model and version than are stored (a re-sent window past the seq check would show
        # here). Fewer is allowed: the last flush interval, and what a hub kill -9 loses of the sums
        # (hub.services.drift_monitor.flush documents it).
        stored = {(d, m, v): (n, r) for d, m, v, n, r in db.execute(
            "SELECT device, model, version, COUNT(*), SUM(requests) FROM telemetry_models GROUP BY device, model, version")}
        summed = {(d, m, v): (n, r) for d, m, v, n, r in db.execute(
            "SELECT device, model, version, SUM(windows), SUM(requests) FROM telemetry_agg GROUP BY device, model, version")}
        db.close()
        over = sorted(k for k, (n, r) in summed.items() if n > stored.get(k, (0, 0))[0] or r > stored.get(k, (0, 0))[1])
        n_stored, n_summed = sum(n for n, _ in stored.values()), sum(n for n, _ in summed.values())
        parts.append(f"drift sums hold {n_summed} of {n_stored} stored model windows (the rest: the last flush "
                     "interval and what hub kills lost of the sums), none beyond")
        if over:
            k = over[0]
            problems.append(f"{len(over)} (device, model, version) counted twice in the drift sums, e.g. {k}: "
                            f"stored (windows, requests) {stored.get(k)}, summed {summed.get(k)}")
        return (not problems, "; ".join(parts) + (" — " + "; ".join(problems) if problems else ""))

    def _audit(self, report: Report) -> tuple[bool, str]:
        try:
            v = self.hub("audit", "verify", check=False)
            entries = [json.loads(line) for line in self.hub("audit", "export").stdout.splitlines() if line.strip()]
        except subprocess.SubprocessError as exc:
            return False, f"audit not readable: {exc}"
        final = {"promoted", "rolled_back", "aborted"}
        seen: dict[tuple[str, str], int] = {}
        for e in entries:
            det = e.get("details", {})
            if det.get("state") in final and det.get("rollout"):
                key = (str(det["rollout"]), str(det["state"]))
                seen[key] = seen.get(key, 0) + 1
        decided = [r for r in report.rollouts if r.get("state") in final and r.get("id")]
        wrong = [f"{r['id']} {r['state']}: {seen.get((r['id'], r['state']), 0)} entries" for r in decided
                 if seen.get((r["id"], r["state"]), 0) != 1]
        dup = [f"{k[0]} {k[1]} x{n}" for k, n in seen.items() if n != 1]
        ok = v.returncode == 0 and not wrong and not dup
        return ok, (f"chain {'intact' if v.returncode == 0 else 'BROKEN: ' + v.stdout.strip()[:200]}, {len(entries)} "
                    f"entries; {len(decided)} final rollout decisions, each once: {'yes' if not wrong and not dup else 'no: ' + '; '.join((wrong + dup)[:3])}")

    def _leaks(self) -> tuple[bool, str]:
        parts, bad = [], []
        for name, samples in self.samples.items():
            last_pid = samples[-1][0]
            life = [s for s in samples if s[0] == last_pid]
            if len(life) < 2:
                parts.append(f"{name}: restarted late, not judged")
                continue
            (_, rss0, th0), (_, rss1, th1) = life[0], life[-1]
            parts.append(f"{name} {rss0:.0f}->{rss1:.0f} MB, {th0}->{th1} threads")
            if rss1 > rss0 * 1.5 + 30 or th1 > th0 + 8:
                bad.append(name)
        return not bad, "; ".join(parts) + (f" — grew: {', '.join(bad)}" if bad else "") + \
            " (limit: RSS 1.5x + 30 MB, threads +8, over each process's own lifetime)"


def render(report: Report, wall: float) -> str:
    by_kind: dict[str, list[FaultRecord]] = {}
    for f in report.faults:
        by_kind.setdefault(f.kind, []).append(f)
    lines = [f"soak: seed {report.seed}, {report.seconds:.0f} s of faults, {wall / 60:.1f} min in all",
             f"faults: {len(report.faults)} — " + ", ".join(
                 f"{k} {len(v)} (recovery median {np.median([f.recovery for f in v if f.recovery is not None] or [float('nan')]):.1f} s, "
                 f"max {max((f.recovery for f in v if f.recovery is not None), default=float('nan')):.1f} s)"
                 for k, v in sorted(by_kind.items()))]
    states: dict[str, int] = {}
    for r in report.rollouts:
        states[r.get("state", "error")] = states.get(r.get("state", "error"), 0) + 1
    lines.append(f"rollouts: {len(report.rollouts)} — " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    false_rb = [f"{r['version']} ({r.get('reason', '')[:120]})" for r in report.rollouts
                if r.get("state") == "rolled_back" and r["candidate"] in GOOD]
    lines.append(f"good candidates rolled back: {len(false_rb)}{': ' + '; '.join(false_rb) if false_rb else ''}")
    bad_promoted = [r["version"] for r in report.rollouts if r.get("state") == "promoted" and r["candidate"] in ("nan", "crash")]
    lines.append(f"bad candidates promoted: {len(bad_promoted)}{' (' + ', '.join(bad_promoted) + ')' if bad_promoted else ''}")
    lines.append(f"inference: {report.served} served, {report.failed} failed (during faults and restarts)")
    for s in report.skipped:
        lines.append(f"skipped: {s}")
    for name, (ok, detail) in report.invariants.items():
        lines.append(f"invariant {name}: {'held' if ok else 'VIOLATED'} — {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600, help="how long faults are injected (default 600)")
    ap.add_argument("--seed", type=int, default=None, help="the fault schedule's seed (default: random, printed)")
    ap.add_argument("--sims", type=int, default=200, help="simulated agents beside the three real ones (default 200)")
    ap.add_argument("--recovery-limit", type=float, default=90.0, help="seconds a fault may take to recover from")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--markdown", help="write the report as BENCHMARKS.md's soak section here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs) and print its path")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"soak seed {seed} (re-run with --seed {seed})", flush=True)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-soak-"))
    soak = Soak(work, seed, recovery_limit=args.recovery_limit, sims=args.sims)
    try:
        report = soak.run(args.seconds)
    except BaseException:
        for name in ("hub", *DEVICES):
            log = work / f"{name}.log"
            if log.exists():
                print(f"--- {name}.log (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        raise
    finally:
        soak.stop()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = render(report, time.monotonic() - t0)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "seed": report.seed, "seconds": report.seconds, "faults": [vars(f) for f in report.faults],
            "rollouts": report.rollouts, "skipped": report.skipped,
            "invariants": {k: {"held": ok, "detail": d} for k, (ok, d) in report.invariants.items()}}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(
            "## 8. Chaos soak\n\nWritten by `python -m bench.soak --seconds N --seed S --markdown FILE` (not part of "
            f"`bench.run_all`): one Mosquitto (persistence on), one hub, three agent processes behind soak-owned "
            f"proxies and {args.sims} simulated agents behind one more, ~40 inference requests/s per real agent, "
            "rollouts back to back on the real agents (good and bad candidates, shadow and split), a promoted "
            "version deployed to the simulated ones every 10-20 s, and one fault at a time at random from the "
            "seed. Baseline: the invariants, which must all hold.\n\n" + "\n".join(f"- {line}" for line in text.splitlines()) + "\n")
    return 0 if report.invariants and all(ok for ok, _ in report.invariants.values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        def _term(*_a: object) -> None:  # once: a second TERM (timeout(1) and a shell both) must not cut the cleanup
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            sys.exit(1)

        signal.signal(signal.SIGTERM, _term)
    sys.exit(main())
