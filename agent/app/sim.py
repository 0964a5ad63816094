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
  and the state file is written once per update rather than at every transition.

Thread rules: paho callbacks (on ``sim-net``) only enqueue; agents publish through an outbox that
``sim-net`` drains, so a paho client is only ever touched by one thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt

from edgefleet.agent import __version__
from edgefleet.agent.adapters.fetch import Fetcher, HttpFetcher
from edgefleet.agent.adapters.mqttlink import parse_broker_url
from edgefleet.agent.adapters.store import Store
from edgefleet.agent.contract.envelope import public_key_from_b64
from edgefleet.agent.contract.errors import EdgefleetError, Refused, Unavailable
from edgefleet.agent.contract.wire import TOPIC_PREFIX, ModelEntry, ModelReport, Reported, Status, Topics
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

    def handle(self, kind: str, payload: bytes) -> None:
        with self.lock:
            try:
                if kind == "keyring":
                    if self.trust.update_keyring(payload, now=self.clock()) is not None and self.pending is not None:
                        self._try_desired()
                elif kind == "desired":
                    self.pending = payload
                    self._try_desired()
                elif kind == "connected":
                    status_topic = self.topics.device(self.device, "status")
                    self.outbox(status_topic, self.status("online"), True)
                    self._publish_reported()
            except EdgefleetError as exc:
                self.refusals.append(f"{exc.reason}: {exc}")
            except Exception as exc:  # a worker thread: nothing above us would see it
                log.exception("simulated agent %s failed on %s", self.device, kind)
                self.refusals.append(f"error: {type(exc).__name__}: {exc}")
            self.on_change(self)

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
        self.store.write_state({**self.trust.state_fields(), "telemetry_seq": 0, **self.core.state_fields()})

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
    agent holds a socket (and paho a socket pair).
    """

    def __init__(self, agents: list[SimAgent], broker_url: str, *, workers: int = 8,
                 keepalive: int = 60) -> None:
        self.agents = agents
        self.address = parse_broker_url(broker_url)
        self.keepalive = keepalive
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-work")
        self._outbox: queue.SimpleQueue[tuple[SimAgent, str, bytes, bool]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self.connected = 0
        self._lock = threading.Lock()

    def _client(self, agent: SimAgent) -> mqtt.Client:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=f"edgefleet-agent-{agent.fleet}-{agent.device}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        c.max_inflight_messages_set(100)
        status_topic = agent.topics.device(agent.device, "status")
        c.will_set(status_topic, agent.status("offline"), qos=1, retain=True)

        def on_connect(cl: mqtt.Client, u: object, f: object, rc: object, p: object = None) -> None:
            if getattr(rc, "is_failure", False):
                return
            cl.subscribe([(agent.topics.keyring, 1), (agent.topics.desired(agent.device), 1)])
            with self._lock:
                self.connected += 1
            self._pool.submit(agent.handle, "connected", b"")

        def on_message(cl: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            if not msg.payload:
                return
            kind = "keyring" if msg.topic == agent.topics.keyring else "desired"
            self._pool.submit(agent.handle, kind, bytes(msg.payload))

        c.on_connect = on_connect
        c.on_message = on_message
        agent.outbox = lambda t, p, r: self._outbox.put((agent, t, p, r))
        return c

    def start(self) -> None:
        for agent in self.agents:
            c = self._client(agent)
            agent.client = c
            c.connect(self.address.host, self.address.port, keepalive=self.keepalive)
            sock = c.socket()
            if sock is not None:
                self._sel.register(sock, selectors.EVENT_READ, agent)
        self._thread = threading.Thread(target=self._loop, name="sim-net", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_misc = 0.0
        while not self._stop.is_set():
            while True:
                try:
                    agent, topic, payload, retain = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if agent.client is not None:
                    agent.client.publish(topic, payload, qos=1, retain=retain)
            for key, _ev in self._sel.select(timeout=0.005):
                c = key.data.client
                if c is not None:
                    c.loop_read()
            for agent in self.agents:
                c = agent.client
                if c is not None and c.want_write():
                    c.loop_write()
            now = time.monotonic()
            if now - last_misc >= 1.0:
                last_misc = now
                for agent in self.agents:
                    if agent.client is not None:
                        agent.client.loop_misc()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._pool.shutdown(wait=True)
        for agent in self.agents:
            if agent.client is not None:
                with contextlib.suppress(Exception):
                    agent.client.disconnect()
                    agent.client.loop_write()
        self._sel.close()
