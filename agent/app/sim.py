"""Simulated-agent mode: many agent cores in one process, for fleet-scale tests and benchmarks.

Each :class:`SimAgent` is one device with its own MQTT connection (own client id, Last Will,
subscriptions to the keyring and its own desired state), its own state directory and
:class:`~agent.adapters.store.Store`, and its own :class:`~agent.core.trust.TrustedState`: keyrings and desired
states go through exactly the checks a real agent applies (signatures, ``seq``, expiry, sizes),
blobs are committed into each device's store with the size and sha256 checks of
:meth:`Store.commit_blob`, and every update runs through the real agent's state machine
(:class:`~agent.core.update.UpdateCore`: the same plan, transitions, refusals and commit), so the
state file is the real agent's, written atomically; a real agent can take a simulated device over.

What is shared, because 1,000 devices do not fit in one process otherwise:

* one :class:`BlobCache` (downloaded once with :class:`~agent.adapters.fetch.HttpFetcher`, then hard-linked
  into each device's store, where it is checked again);
* one network thread (``sim-net``) driving every paho client through its external-loop API, and a
  small pool of ``sim-work`` threads applying desired states (disk writes release the GIL);
* no ONNX Runtime session per device: a model counts as active once verified and committed.
  Serving cost per device is what ``bench.serving_inproc`` measures. No guard process either,
  and the state file is written once per update rather than at every transition;
* telemetry (``SimFleet(telemetry_every=10)``): each agent closes a window on that period, its
  start spread over the period across the fleet; the window's requests are synthetic (seeded
  latencies and input rows), their folding is the real agent's (:func:`~agent.core.telemetry.fold`
  on the active entry's reference) and so is the wire form and the per-device ``seq``. No spool:
  a window is published QoS 1 and kept in memory (at most ``SimAgent.MAX_UNACKED``, the oldest
  dropped and counted in ``dropped``) until the hub acknowledges it (``wire.TelemetryAck``), re-sent
  after ``RESEND_SECONDS`` and on every reconnect, as the real agent's spool does.

Reconnects: an agent whose connection drops (broker restart, network cut, missed keepalive)
reconnects as the real agent does (:class:`~agent.core.reconnect.Failover`: to the next node
when the broker URL lists several, after a jittered wait), with waits of 0.5 s doubling to 10 s
per failed round; its socket leaves and re-enters ``sim-net``'s selector through paho's socket
open/close callbacks.

Thread rules: paho callbacks (on ``sim-net``) only enqueue; agents publish through an outbox that
``sim-net`` drains, so a paho client is only ever touched by one thread.

Scale: ``sim-net`` waits on every socket with :mod:`selectors` (epoll on Linux), never with
``select()``, whose descriptor sets stop at 1,023; paho's own loops (``loop_start``,
``loop_forever``) use ``select()`` and are not used here. Each agent holds one socket: raise
``RLIMIT_NOFILE`` above the fleet size (``bench.common.raise_nofile``).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import queue
import random
import selectors
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from edgefleet.agent import __version__
from edgefleet.agent.adapters.fetch import Fetcher, HttpFetcher
from edgefleet.agent.adapters.store import Store
from edgefleet.agent.contract.broker import client_id, parse_broker_urls
from edgefleet.agent.contract.envelope import public_key_from_b64
from edgefleet.agent.contract.errors import EdgefleetError, Refused, Unavailable
from edgefleet.agent.contract.wire import (
    SUBSCRIBE_QOS,
    TOPIC_PREFIX,
    ModelEntry,
    ModelReport,
    Reported,
    Status,
    TelemetryAck,
    TelemetryWindow,
    Topics,
    parse_json_object,
)
from edgefleet.agent.core.reconnect import Failover
from edgefleet.agent.core.telemetry import Snapshot, fold
from edgefleet.agent.core.trust import NoKeyring, TrustedState, VerifiedDesired
from edgefleet.agent.core.update import Step, UpdateCore

__all__ = ["BlobCache", "SimAgent", "SimFleet"]

log = logging.getLogger("edgefleet.sim")
Clock = Callable[[], float]


class BlobCache:
    """One verified copy of each blob for the whole simulated fleet (itself a :class:`Store`)."""

    def __init__(self, root: Path, fetcher: Fetcher | None = None) -> None:
        self.store = Store(root)
        self.fetcher: Fetcher = fetcher or HttpFetcher()
        self._lock = threading.Lock()
        self.downloads = 0

    def path(self, entry: ModelEntry) -> Path:
        with self._lock:
            if not self.store.has_blob(entry.sha256, entry.size):
                part = self.store.partial_path(entry.sha256)
                self.fetcher.fetch(entry.url, part, size=entry.size)
                self.store.commit_blob(part, entry.sha256, entry.size)
                self.downloads += 1
            return self.store.blob_path(entry.sha256)


class SimAgent:
    """One simulated device. ``handle`` runs on a worker thread, one message at a time."""

    MAX_UNACKED = 1000  # telemetry windows kept for re-sending until the hub acknowledges them
    RESEND_SECONDS = 30.0

    def __init__(self, *, fleet: str, device: str, root_public_key: str, state_dir: Path,
                 cache: BlobCache, clock: Clock = time.time, max_blob_bytes: int | None = None,
                 prefix: str = TOPIC_PREFIX) -> None:
        self.fleet = fleet
        self.device = device
        self.clock = clock
        self.topics = Topics(fleet, prefix=prefix)
        self.store = Store(state_dir)
        self.cache = cache
        self.trust = TrustedState(root=public_key_from_b64(root_public_key), fleet=fleet,
                                  device=device, max_blob_bytes=max_blob_bytes)
        self.lock = threading.Lock()
        self.core = UpdateCore()
        self.active: dict[str, ModelEntry] = {}
        self.pending: bytes | None = None
        self.refusals: list[str] = []
        self.outbox: Callable[[str, bytes, bool], None] = lambda _t, _p, _r: None
        self.on_change: Callable[[SimAgent], None] = lambda _a: None
        self.client: mqtt.Client | None = None
        self.telemetry_seq = 0
        self.windows_sent = 0
        self.unacked: dict[int, tuple[bytes, float]] = {}  # seq -> (window, monotonic time last sent)
        self.dropped = 0  # windows dropped unacknowledged past MAX_UNACKED
        self._window_start = clock()
        self._rng = np.random.default_rng(zlib.crc32(device.encode()))

    def handle(self, kind: str, payload: bytes) -> None:
        with self.lock:
            try:
                if kind == "keyring":
                    if self.trust.update_keyring(payload, now=self.clock()) is not None and self.pending is not None:
                        self._try_desired()
                elif kind == "desired":
                    self.pending = payload
                    self._try_desired()
                elif kind == "retry":  # a state refused (e.g. by a wrong clock) or left waiting: again
                    self._try_desired()
                elif kind == "acked":
                    ack = TelemetryAck.from_dict(parse_json_object(payload, "telemetry ack"))
                    if ack.device == self.device:
                        for seq in ack.seqs:
                            self.unacked.pop(seq, None)
                elif kind == "connected":
                    status_topic = self.topics.device(self.device, "status")
                    self.outbox(status_topic, self.status("online"), True)
                    self._publish_reported()
                    self._resend(0.0)
            except EdgefleetError as exc:
                self.refusals.append(f"{exc.reason}: {exc}")
            except Exception as exc:  # a worker thread: nothing above us would see it
                log.exception("simulated agent %s failed on %s", self.device, kind)
                self.refusals.append(f"error: {type(exc).__name__}: {exc}")
            self.on_change(self)

    def close_window(self, requests: int = 20) -> None:
        """Close a telemetry window of ``requests`` synthetic requests per active model, folded as
        the real agent folds them, and publish it (QoS 1, not retained) with the next ``seq``."""
        with self.lock:
            now = self.clock()
            models = {}
            for name, entry in self.active.items():
                features = len(entry.reference.features) if entry.reference is not None else 4
                rows = self._rng.normal(size=(requests, max(1, features)))
                snap = Snapshot(version=entry.version, requests=requests, errors=0, rows=requests,
                                latencies_s=self._rng.lognormal(np.log(2e-4), 0.3, size=requests),
                                dropped_latencies=0, inputs=[rows],
                                outputs=[(rows[:, 0] > 0).astype(np.int64)])
                models[name] = fold(snap, entry.reference)
            self.telemetry_seq += 1
            tw = TelemetryWindow(
                fleet=self.fleet, device=self.device, seq=self.telemetry_seq, window_start=self._window_start,
                window_end=now, models=models,
                metrics={"requests": float(requests * len(models)), "errors": 0.0},
                agent_version=f"{__version__}-sim",
                extra={"active_versions": {n: e.version for n, e in self.active.items()}},
            )
            self._window_start = now
            self.windows_sent += 1
            payload = tw.to_json()
            self.unacked[tw.seq] = (payload, time.monotonic())
            while len(self.unacked) > self.MAX_UNACKED:
                del self.unacked[next(iter(self.unacked))]  # the oldest (dicts keep insertion order)
                self.dropped += 1
            self.outbox(self.topics.device(self.device, "telemetry"), payload, False)

    def resend(self, older_than: float | None = None) -> None:
        """Publish again the windows sent more than ``older_than`` seconds ago (default
        ``RESEND_SECONDS``) that the hub has not acknowledged (a worker; takes the lock)."""
        with self.lock:
            self._resend(older_than)

    def _resend(self, older_than: float | None) -> None:
        age = self.RESEND_SECONDS if older_than is None else older_than
        now = time.monotonic()
        topic = self.topics.device(self.device, "telemetry")
        for seq, (payload, sent) in list(self.unacked.items()):
            if now - sent >= age:
                self.unacked[seq] = (payload, now)
                self.outbox(topic, payload, False)

    def _try_desired(self) -> None:
        raw = self.pending
        if raw is None:
            return
        try:
            verified = self.trust.check_desired(raw, now=self.clock())
        except NoKeyring:
            return
        self.pending = None
        if verified is not None and not self.core.reported_failed(verified.digest):
            self._apply(verified)

    def _apply(self, verified: VerifiedDesired) -> None:
        desired, core = verified.state, self.core
        core.begin(seq=desired.seq, digest=verified.digest, raw=verified.raw)
        plan = core.plan(desired.seq, desired.models, {})  # a canary entry's candidate is installed as is
        if plan.noop:
            core.noop(desired.seq)
        for name, entry in plan.changed.items():
            try:
                self._stage(name, entry, reusable=name in plan.reusable)
            except Refused as exc:
                core.refuse(name, entry, seq=desired.seq, digest=verified.digest, reason=exc.reason)
                self._write_state()
                raise
            except Unavailable as exc:  # retried on the next delivery (the real agent: on a timer)
                core.transition(name, Step.FAIL, entry, reason=exc.reason)
                core.wait_for_network()
                self._write_state()
                raise
        if not plan.noop:
            core.commit(plan, set(plan.changed), None)
        self.trust.mark_applied(verified)
        self._write_state()
        self.active = {n: ModelEntry.from_dict(r["entry"]) for n, r in core.models.items() if r.get("entry")}
        self.store.gc(core.keep())
        self._publish_reported()

    def _stage(self, name: str, entry: ModelEntry, *, reusable: bool) -> None:
        """The real agent's steps up to ``stage``, the download replaced by a hard link from the
        fleet's cache and no session opened."""
        core = self.core
        if reusable and self.store.verify_blob(entry.sha256, entry.size):
            core.transition(name, Step.LOCAL, entry)
        else:
            core.transition(name, Step.FETCH, entry)
            if not self.store.has_blob(entry.sha256, entry.size):
                part = self.store.partial_path(entry.sha256)
                part.unlink(missing_ok=True)
                os.link(self.cache.path(entry), part)
                core.transition(name, Step.VERIFY, entry)
                self.store.commit_blob(part, entry.sha256, entry.size)
            else:
                core.transition(name, Step.VERIFY, entry)
        core.transition(name, Step.STAGE, entry)

    def _write_state(self) -> None:
        # The real agent's state format (agent.app.updater.Updater.persist): a real agent can take over.
        self.store.write_state({**self.trust.state_fields(), "telemetry_seq": self.telemetry_seq,
                                **self.core.state_fields()})

    def status(self, state: str) -> bytes:
        return Status(fleet=self.fleet, device=self.device, state=state,
                      agent_version=f"{__version__}-sim").to_json()

    def _publish_reported(self) -> None:
        rep = Reported(fleet=self.fleet, device=self.device, seq=self.trust.last_seq,
                       time=self.clock(),
                       models={n: ModelReport(version=e.version, sha256=e.sha256, state=self.core.phase(n).value)
                               for n, e in self.active.items()},
                       agent_version=f"{__version__}-sim")
        self.outbox(self.topics.device(self.device, "reported"), rep.to_json(), True)


class SimFleet:
    """Run many :class:`SimAgent` over real MQTT connections from one process.

    ``start`` connects every agent (blocking TCP connects, a few ms for 1,000 on loopback) and
    starts the network thread; ``stop`` disconnects cleanly. Raise ``RLIMIT_NOFILE`` first: each
    agent holds one socket.
    """

    def __init__(self, agents: list[SimAgent], broker_url: str, *, workers: int = 32,
                 keepalive: int = 60, telemetry_every: float | None = None) -> None:
        self.agents = agents
        self._first_every = telemetry_every  # the schedule start() begins with
        self.addresses = parse_broker_urls(broker_url)
        # per agent, seeded by its id: a run is repeatable, and the fleet spreads over the nodes
        self._failover = {a: Failover(len(self.addresses), base=0.5, cap=10.0, floor=0.05,
                                      rng=random.Random(zlib.crc32(a.device.encode())))
                          for a in agents}
        self.keepalive = keepalive
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-work")
        self._outbox: queue.SimpleQueue[tuple[SimAgent, str, bytes, bool]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # telemetry: (period, heap of (when, agent index)); replaced whole by start_telemetry
        self._schedule: tuple[float | None, list[tuple[float, int]]] = (None, [])
        self._sel = selectors.DefaultSelector()
        # Agents whose client has packets to send (paho's socket write callbacks keep it), so that
        # each turn of sim-net touches only those, not the whole fleet.
        self._writers: set[SimAgent] = set()
        self._unacked = 0  # QoS 1 publishes without their PUBACK yet (sim-net only)
        self.connected = 0
        self.reconnects = 0
        self._lock = threading.Lock()
        self._down: dict[SimAgent, float] = {}  # agent -> when to retry; sim-net only
        self._online: set[SimAgent] = set()

    def _client(self, agent: SimAgent) -> mqtt.Client:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=client_id("agent", agent.fleet, agent.device),
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        c.max_inflight_messages_set(100)
        status_topic = agent.topics.device(agent.device, "status")
        c.will_set(status_topic, agent.status("offline"), qos=1, retain=True)

        def on_connect(cl: mqtt.Client, u: object, f: object, rc: object, p: object = None) -> None:
            if getattr(rc, "is_failure", False):
                return
            self._failover[agent].connected()
            cl.subscribe([(t, SUBSCRIBE_QOS) for t in (agent.topics.keyring, agent.topics.desired(agent.device),
                                                       acked)])
            with self._lock:
                if agent not in self._online:
                    self._online.add(agent)
                    self.connected += 1
            self._submit(agent.handle, "connected", b"")

        def on_disconnect(cl: mqtt.Client, u: object, f: object, rc: object, p: object = None) -> None:
            with self._lock:
                if agent in self._online:
                    self._online.discard(agent)
                    self.connected -= 1
            if not self._stop.is_set():
                self._retry_later(agent, time.monotonic())

        acked = agent.topics.device(agent.device, "acked")

        def on_message(cl: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            if not msg.payload:
                return
            kind = ("keyring" if msg.topic == agent.topics.keyring else "acked" if msg.topic == acked else "desired")
            self._submit(agent.handle, kind, bytes(msg.payload))

        def on_socket_open(cl: mqtt.Client, u: object, sock: object) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.register(sock, selectors.EVENT_READ, agent)  # type: ignore[arg-type]

        def on_socket_close(cl: mqtt.Client, u: object, sock: object) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)  # type: ignore[arg-type]

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = on_message
        c.on_socket_open = on_socket_open
        c.on_socket_close = on_socket_close
        def on_publish(cl: mqtt.Client, u: object, mid: int, rc: object = None, p: object = None) -> None:
            self._unacked -= 1

        c.on_publish = on_publish
        c.on_socket_register_write = lambda _c, _u, _s: self._writers.add(agent)
        c.on_socket_unregister_write = lambda _c, _u, _s: self._writers.discard(agent)
        agent.outbox = lambda t, p, r: self._outbox.put((agent, t, p, r))
        return c

    def start(self) -> None:
        for agent in self.agents:
            c = self._client(agent)
            agent.client = c
            addr = self.addresses[self._failover[agent].index]
            c.connect_async(addr.host, addr.port, keepalive=self.keepalive)
            try:
                c.reconnect()  # blocking TCP connect; on_socket_open registers the socket
            except OSError:  # that node is down: the next one, later
                self._retry_later(agent, time.monotonic())
        self.start_telemetry(self._first_every)
        self._thread = threading.Thread(target=self._loop, name="sim-net", daemon=True)
        self._thread.start()

    def start_telemetry(self, every: float | None) -> None:
        """Every agent closes a window each ``every`` seconds from now on, the first ones spread
        over one period across the fleet (``None``: no more windows)."""
        due: list[tuple[float, int]] = []
        if every:
            t0, n = time.monotonic(), len(self.agents)
            due = [(t0 + every * (i + 1) / n, i) for i in range(n)]  # sorted: already a heap
        self._schedule = (every, due)  # one assignment: sim-net sees the old schedule or the new one

    def _tick_telemetry(self, now: float) -> None:
        every, heap = self._schedule
        while every and heap and heap[0][0] <= now:
            due, i = heapq.heappop(heap)
            agent = self.agents[i]
            if agent.active:
                self._submit(agent.close_window)
            heapq.heappush(heap, (due + every, i))

    def idle(self) -> bool:
        """Nothing queued to publish, nothing unwritten, no QoS 1 publish awaiting its PUBACK."""
        return self._outbox.empty() and not self._writers and self._unacked == 0

    def _loop(self) -> None:
        last_misc = 0.0
        while not self._stop.is_set():
            while True:
                try:
                    agent, topic, payload, retain = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if agent.client is not None:
                    self._unacked += 1
                    agent.client.publish(topic, payload, qos=1, retain=retain)
            for key, _ev in self._sel.select(timeout=0.005):
                c = key.data.client
                if c is not None:
                    c.loop_read()
            for agent in list(self._writers):
                c = agent.client
                if c is not None:
                    c.loop_write()
            now = time.monotonic()
            self._tick_telemetry(now)
            if self._down:
                self._reconnect_due(now)
            if now - last_misc >= 1.0:
                last_misc = now
                for agent in self.agents:
                    if agent.client is not None:
                        agent.client.loop_misc()
                        if agent.unacked and agent in self._online:
                            self._submit(agent.resend)
                        if agent.pending is not None and agent.trust.keyring is not None:
                            self._submit(agent.handle, "retry", b"")  # the real agent's retry timer

    def _submit(self, fn: Callable[..., object], *args: object) -> None:
        """Hand work to the pool; once ``stop`` has shut it down, what comes is dropped (the
        fleet is going away: a late re-send or reconnect has nothing left to do)."""
        with contextlib.suppress(RuntimeError):
            self._pool.submit(fn, *args)

    def _retry_later(self, agent: SimAgent, now: float) -> None:
        """The agent's connection (or attempt) failed: point it at the next node, retry later."""
        _, delay = self._failover[agent].failed()
        addr = self.addresses[self._failover[agent].index]
        if agent.client is not None:
            agent.client._host, agent.client._port = addr.host, addr.port  # as MqttLink._next_broker does
        self._down[agent] = now + delay

    def _reconnect_due(self, now: float) -> None:
        """Reconnect the agents whose retry time has come (sim-net only)."""
        for agent, at in list(self._down.items()):
            if at > now or agent.client is None:
                continue
            try:
                agent.client.reconnect()
            except OSError:
                self._retry_later(agent, now)
                continue
            del self._down[agent]
            self.reconnects += 1

    def stop(self, drain: float = 10.0) -> None:
        """Stop closing windows, let the workers finish, then give ``sim-net`` up to ``drain``
        seconds to publish what they queued and get the broker's acknowledgements, and disconnect
        every agent cleanly: nothing an agent counted as sent is left behind."""
        self.start_telemetry(None)
        self._pool.shutdown(wait=True)
        deadline = time.monotonic() + drain
        while self._thread is not None and time.monotonic() < deadline and not self.idle():
            time.sleep(0.02)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for agent in self.agents:
            if agent.client is not None:
                with contextlib.suppress(Exception):
                    agent.client.disconnect()
                    agent.client.loop_write()
        self._sel.close()
