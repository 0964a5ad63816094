"""The hub daemon: owns the database, signs and publishes, ingests what devices report.

Threads: ``hub-http`` (admin API and blob server), paho's network thread (publishes: keyring,
desired states, alerts), ``mqtt-ingest-*`` (:class:`hub.adapters.ingestlink.IngestLink`: receives device
messages and enqueues them; on NATS ``jetstream-ingest-*``, :mod:`hub.adapters.jetstream`), ``hub-ingest`` (drains the queue and writes batches in one
transaction each), ``hub-main`` (re-signs desired states before they expire), ``hub-rollouts``
(judges running rollouts, see :mod:`hub.services.rollout_manager`). Every write goes through :mod:`hub.db`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent import __version__
from edgefleet.agent.adapters.capture import parse_batch
from edgefleet.agent.adapters.mqttlink import MqttLink
from edgefleet.agent.contract.broker import client_id
from edgefleet.agent.contract.envelope import open_envelope
from edgefleet.agent.contract.errors import ConfigError, EdgefleetError, MalformedMessage
from edgefleet.agent.contract.wire import (
    Event,
    Keyring,
    ModelEntry,
    Reference,
    Reported,
    Status,
    TelemetryAck,
    TelemetryWindow,
    Topics,
    canonical_json,
    check_name,
    format_time,
    parse_json_object,
)
from edgefleet.hub.adapters.fastjson import loads_object
from edgefleet.hub.adapters.home import HubHome, create_private, keyring_path
from edgefleet.hub.adapters.ingestlink import IngestLink

if TYPE_CHECKING:
    from edgefleet.hub.adapters.jetstream import JetStreamIngest
from edgefleet.hub.adapters.modelfile import validate_onnx
from edgefleet.hub.adapters.preflight import accept as accept_preflight
from edgefleet.hub.adapters.tokens import TokenStore
from edgefleet.hub.core.access import Token, check_role, check_token_name
from edgefleet.hub.core.desired import KEYRING_RENEW_DAYS, build_desired, keyring_expiry, model_entry
from edgefleet.hub.core.drift import Policy as DriftPolicy
from edgefleet.hub.core.lineage import clean_lineage, diff_versions, find_decision
from edgefleet.hub.db import Database
from edgefleet.hub.errors import BadRequest, Conflict, NotAuthorized, NotFound
from edgefleet.hub.services.controller import Controller, replica_name
from edgefleet.hub.services.drift_monitor import ALERT_KIND, DriftMonitor, Staged, load_drift_config
from edgefleet.hub.services.enrol import (
    device_broker_url,
    hub_link_options,
    issue_credentials,
    list_devices,
    revoke_device,
    undo_credentials,
)
from edgefleet.hub.services.groups import check_group, deploy_targets, group_of
from edgefleet.hub.services.keys import roots_path
from edgefleet.hub.services.metrics import render as render_metrics
from edgefleet.hub.services.rollout_manager import RolloutManager

__all__ = ["Hub"]

log = logging.getLogger("edgefleet.hub")
Clock = Callable[[], float]
INGEST_BATCH = 1000
# Messages received but not yet stored. When it is full the ingest links stop reading, so the
# broker keeps the rest (QoS 1, unacknowledged) instead of this process's memory.
INBOX_LIMIT = 20_000
INGEST_LINGER, INGEST_LINGER_BELOW = 0.005, 100  # wait 5 ms for more when fewer than 100 are queued
KEYRING_ALERT_EVERY = 86400.0  # a keyring alert is repeated daily while the keyring needs renewing
# How long the `device add` that enrolled a device may cancel it (it could not write the bundle).
ENROLMENT_CANCEL_SECONDS = 600.0


@dataclass(frozen=True)
class _Enrolment:
    secret_sha256: str
    at: float
    serial: str | None  # what to take back: the certificate, the password
    password: bool


def freeze_startup_heap() -> None:
    """Put every object alive now (imported modules, the hub's own state) out of the cyclic
    garbage collector's reach (:func:`gc.freeze`); ``edgefleet-hub serve`` calls it once the hub
    has started.

    Ingest batches keep a batch's parsed windows alive across young collections, so they reach
    the oldest generation and set off full collections, each of which walked the ~40,000 objects
    the process holds from its start: about 10 µs per ingested window, 17 % of the ingest
    thread's time (``bench.hub_ingest`` in a fresh process: 16.8k windows/s, 20.3k frozen, 20.6k
    with the collector off). Frozen objects are still freed by reference counting; only a cycle
    among them would outlive its use, and what exists at start lives as long as the process.
    """
    gc.collect()
    gc.freeze()


def _jetstream() -> Any:
    """hub.adapters.jetstream, which needs nats-py (the ``nats`` extra): only a hub on NATS imports it."""
    try:
        from edgefleet.hub.adapters import jetstream
    except ImportError as exc:
        raise ConfigError(f"hub.toml sets jetstream_url (a NATS broker) but nats-py is not installed ({exc}); "
                          "pip install 'edgefleet[hub,nats]'") from exc
    return jetstream


MAX_REFERENCE_BYTES = 1 << 20  # a version's reference, as JSON: desired states carry it to every device
DESIRED_SEEN_LIMIT = 100_000  # desired states read back from the broker awaiting the guard, at most


def _desired_seq_of(payload: bytes) -> int:
    """The ``seq`` of a desired-state envelope as the broker holds it, no signature checked (the
    stored state is the hub's truth; this only says whether the broker's copy is older). An empty
    (cleared) or unreadable copy counts as 0: older than any stored state."""
    try:
        body = json.loads(open_envelope(payload).payload)
        seq = body.get("seq") if isinstance(body, dict) else None
    except (MalformedMessage, ValueError):
        return 0
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0


class Hub:
    def __init__(
        self,
        home: HubHome,
        *,
        broker_url: str | None = None,
        http_listen: str | None = None,
        clock: Clock = time.time,
        share_group: str | None = None,
        ingest_workers: int = 1,
        replica: str | None = None,
    ) -> None:
        """``share_group`` subscribes to device channels through the MQTT shared subscription
        ``$share/{group}/...`` so that hub replicas (and this hub's ``ingest_workers`` links,
        each its own MQTT connection and ingest thread) split the telemetry load.

        ``replica`` names this replica's MQTT client id and persistent session
        (``edgefleet-hub-{fleet}-{replica}``, or ``{broker user}-{replica}`` on a broker written
        by ``broker-config``): replicas that share one id take the connection from each other.
        The broker keeps queueing a share of the messages to a replica's session while it is
        away (Mosquitto 2.0 does), and delivers them when it returns."""
        if ingest_workers < 1:
            raise ValueError(f"ingest_workers must be at least 1, got {ingest_workers}")
        if ingest_workers > 1 and not share_group:
            share_group = "edgefleet-hub"  # without $share every link would get every message
        self.share_group = share_group
        self.replica = check_name(replica, "replica name") if replica is not None else None
        self.ingest_workers = ingest_workers
        self._known: frozenset[str] | None = None  # registered device ids (see _known_devices)
        self._known_at = 0.0
        self._ingest_links: list[IngestLink | JetStreamIngest] = []
        self._desired_publish = threading.Lock()  # desired states: read from the database and published as one step
        # Desired states as the broker delivers them back to the hub (its own subscription): the
        # guard re-publishes any device whose copy there is older than the stored one.
        self._desired_seen: queue.Queue[tuple[str, int]] = queue.Queue(DESIRED_SEEN_LIMIT)  # (device, seq)
        self.stale_desired_fixed = 0  # devices whose broker copy was older and was published again
        self.desired_checked = 0  # desired states read back from the broker and compared
        self.home = home
        self.config = home.config()
        self.broker_url = broker_url or self.config.broker_url
        self.http_listen = http_listen or self.config.http_listen
        self.clock = clock
        self.topics = Topics(self.config.fleet)
        loose = home.open_to_others()
        if loose:
            log.warning("the hub home is open to other users (%s): chmod -R go= %s", ", ".join(loose), home.path)
        if not self.config.db:
            create_private(home.db_path)  # before SQLite creates it with the umask's mode
        self.replica_id = replica_name(self.replica)  # names this process's database sessions
        self.db = Database(home.db_url, name=self.replica_id)
        # who may call the admin API: HOME/tokens.json, or the database replicas share
        self.tokens = TokenStore(home.tokens_path, home.token_path,
                                 db=self.db if self.db.engine == "postgresql" else None)
        self.tokens.tokens()  # a home with admin.token alone gets its token file now
        self.signing_key = home.signing_key()
        self.blob_store = home.blob_store()  # HOME/blobs, or the object store replicas share
        self._keyring = self._load_keyring()
        home.root_public_b64()  # a home from before keys/root.pub gets it now, or the hub does not start
        # Enrolments the CLI may still cancel (it could not write the bundle): device -> record.
        self._enrolments: dict[str, _Enrolment] = {}
        self._keyring_alert: tuple[str, float] | None = None  # (state, when) of the last keyring alert
        self._enrol_lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, str, bytes]] = queue.Queue(INBOX_LIMIT)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.counters = {"ingested": 0, "duplicates": 0, "malformed": 0, "unknown_device": 0, "failed": 0}
        self._counters_lock = threading.Lock()
        self.link: MqttLink | None = None
        self.http: Any = None
        self.metrics_http: Any = None  # hub.toml metrics_listen: /metrics without a token
        self.public_url = ""
        # The controller's work (rollout gates, drift alarms, re-signing, retention) runs on one
        # replica at a time, the elected one (hub.services.controller).
        self.controller = Controller(self.db, self.replica_id, lease_seconds=self.config.controller_lease_seconds,
                                     on_elected=self._on_elected, on_demoted=self._on_demoted)
        self.drift = DriftMonitor(  # telemetry aggregation, drift scores and alerts
            db=self.db, config=load_drift_config(home.path / "drift.toml"), topics=self.topics, clock=clock,
            publish=self._publish, assign=self._assign_one, leading=lambda: self.controller.leading,
            fence=self.controller.fence)
        self.rollouts = RolloutManager.attach(self, home.path / "rollout.toml")  # staged rollouts: cohorts, gates, evaluator thread

    # -- lifecycle -------------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool, qos: int = 1) -> None:
        """QoS 1 on the broker link (the drift monitor's alerts); nothing without one."""
        if self.link is not None:
            self.link.publish(topic, payload, qos=qos, retain=retain)

    def _load_keyring(self) -> bytes:
        """The root-signed keyring (written by ``init`` and the key ceremonies): the daemon never
        holds the root private key, so it cannot sign one itself."""
        path = keyring_path(self.home)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"no keyring at {path}: it is signed by the fleet root key, which the hub does not "
                f"hold while it runs; sign one with `edgefleet-hub keys renew-keyring --home {self.home.path} "
                "--root-key PATH` (the root private key; default HOME/keys/root.pem)"
            ) from None

    @property
    def _client_id(self) -> str:
        """With a broker user (``broker-config``: ``hub@FLEET``) the id starts with it: the
        broker's hub listener leaves client ids to the hub, and no device id contains ``@``, so
        no device can take the hub's id (and its session) over. Without one, the fleet's name."""
        if self.config.broker_username:
            return self.config.broker_username + (f"-{self.replica}" if self.replica else "")
        return client_id("hub", self.config.fleet, self.replica or "")

    def start(self) -> None:
        from edgefleet.hub.adapters.api import HubHttpServer, MetricsHttpServer, split_listen

        host, _, port = self.http_listen.rpartition(":")
        self.http = HubHttpServer(self, host or "127.0.0.1", int(port))
        if self.config.metrics_listen:
            self.metrics_http = MetricsHttpServer(self.metrics, *split_listen(self.config.metrics_listen,
                                                                              "hub.toml metrics_listen"))
        bound_host, bound_port = self.http.address
        self.public_url = self.config.public_url or f"{self.http.scheme}://{bound_host}:{bound_port}"
        subs = [(self.topics.all_devices(c), 1) for c in ("reported", "telemetry", "events", "status")]
        if self.share_group:
            subs = [(f"$share/{self.share_group}/{t}", q) for t, q in subs]
        opts = hub_link_options(self.home, self.config)
        # Publishing (keyring, desired states, alerts): paho, a clean session of its own. It also
        # reads the desired states back (QoS 0: they are retained state), see _guard_desired.
        self.link = MqttLink(url=self.broker_url, client_id=f"{self._client_id}-pub",
                             subscriptions=[(self.topics.all_devices("desired"), 0)], on_message=self._on_desired_seen,
                             on_connect=self._on_connect, **opts)
        self.link.start()
        # Receiving device messages: persistent sessions (with a persistent broker, telemetry
        # published while the hub is away, or the broker restarts, is queued for it instead of
        # dropped), the first under the hub's own client id.
        # On NATS (hub.toml jetstream_url), from the fleet's JetStream stream through the durable
        # consumer every replica shares (hub.adapters.jetstream) instead.
        for i in range(self.ingest_workers):
            client_id = self._client_id + (f"-ingest{i}" if i else "")
            link: IngestLink | JetStreamIngest
            if self.config.jetstream_url:
                link = _jetstream().JetStreamIngest(url=self.config.jetstream_url, client_id=client_id, fleet=self.config.fleet,
                                       on_batch=self._on_batch, ca_file=opts.get("ca_file"),
                                       cert_file=opts.get("cert_file"), key_file=opts.get("key_file"))
            else:
                link = IngestLink(url=self.broker_url, client_id=client_id, subscriptions=subs,
                                  on_batch=self._on_batch, clean_session=False,
                                  **{k: v for k, v in opts.items() if k not in ("cert_file", "key_file")})
            link.start()
            self._ingest_links.append(link)
        self.controller.start()  # elected (or not) before the controller's threads first look
        self.http.start()
        if self.metrics_http is not None:
            self.metrics_http.start()
        workers = [(f"hub-ingest-{i}" if i else "hub-ingest", self._ingest_loop) for i in range(self.ingest_workers)]
        for name, target in (*workers, ("hub-main", self._main_loop), ("hub-desired-guard", self._guard_desired)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.rollouts.start()
        self.home.write_run({"http": self.http.url, "broker": self.broker_url, "public_url": self.public_url,
                             **({"metrics": self.metrics_http.url} if self.metrics_http is not None else {})})
        log.info("hub for fleet %s: %s://%s:%d, broker %s", self.config.fleet, self.http.scheme, bound_host,
                 bound_port, self.broker_url)
        if self.metrics_http is not None:
            log.info("Prometheus metrics without a token on %s (metrics_listen)", self.metrics_http.url)

    def stop(self) -> None:
        for link in self._ingest_links:  # first: no new messages; then store what they took
            link.stop()
        deadline = time.monotonic() + 10.0
        while not self._inbox.empty() and time.monotonic() < deadline and any(t.is_alive() for t in self._threads):
            time.sleep(0.02)
        self._stop.set()
        for _ in range(self.ingest_workers):
            with contextlib.suppress(queue.Full):  # then the ingest threads see _stop after their batch
                self._inbox.put_nowait(("", "", b""))
        self.rollouts.stop()
        for t in self._threads:
            t.join(10)
        self._score_drift()  # the last interval's sums
        self.controller.stop()
        if self.http is not None:
            self.http.stop()
        if self.metrics_http is not None:
            self.metrics_http.stop()
        if self.link is not None:
            self.link.stop()
        self.home.clear_run()
        self.db.close()

    # -- the elected controller ------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this replica is the controller (:mod:`hub.services.controller`)."""
        return self.controller.leading

    def fence(self, conn: Any) -> None:
        """Refuse (Fenced) a controller write once this replica no longer leads."""
        self.controller.fence(conn)

    def _on_elected(self, epoch: int) -> None:
        """Take over what the previous controller left: the rollouts as stored, the drift alarm
        state, and the retained messages (re-published, for a broker node that lost them)."""
        self.rollouts.sync()
        self.drift.take_over()
        if self.link is not None and self.link.connected.is_set():
            self._on_connect()

    def _on_demoted(self, reason: str) -> None:
        log.warning("controller work stops on this replica: %s", reason)

    # -- MQTT ------------------------------------------------------------------------------------

    def _on_connect(self) -> None:
        """Publish retained keyring and every current desired state: a broker that lost its
        retained messages (restart without persistence) gets them back."""
        assert self.link is not None
        roots = roots_path(self.home)
        if roots.exists():  # root rotations first: the keyring may be signed by the newest root
            self.link.publish(self.topics.roots, roots.read_bytes(), qos=1, retain=True)
        self.link.publish(self.topics.keyring, self._keyring, qos=1, retain=True)
        # Read and publish under the lock every desired-state publish takes: a state signed while
        # this runs is then published after the older one read here, never before it, so the
        # broker's retained copy is never left at an older seq (seen in a soak: devices and the
        # soak's monitor received a re-published older state after its successor).
        with self._desired_publish:
            for device, envelope in self.db.desired_envelopes():
                self.link.publish(self.topics.desired(device), envelope.encode(), qos=1, retain=True)

    def _on_desired_seen(self, topic: str, payload: bytes, retain: bool) -> None:
        """A desired state as the broker delivered it (paho's thread: never block). Only the
        controller acts on them, so the other replicas stop here; the controller queues the
        device and seq, not the payload (a reconnect brings every device's). When the queue is
        full the next take-over or reconnect re-publishes every state anyway."""
        if not self.leading:
            return
        parsed = self.topics.parse(topic)
        if parsed is None or parsed[1] != "desired":
            return
        with contextlib.suppress(queue.Full):
            self._desired_seen.put_nowait((parsed[0], _desired_seq_of(payload)))

    def _guard_desired(self) -> None:
        """Keep the broker's retained desired state of every device at the stored (newest) one.

        QoS 1 means paho re-sends a publish the broker did not acknowledge before a connection
        dropped, and it does so right after the reconnect's own fresh publishes: an older state
        then lands after its successor and stays retained, and a device that connects later
        receives it (seen in the soak). A broker restoring an older retained copy from its
        persistence file would do the same. The hub subscribes to the desired topics, so every
        state the broker takes, retained at subscribe or published, comes back here; the last one
        seen per device in a batch is what the broker retains, and if its seq is below the stored
        one, the controller publishes the stored state again (after the stale one, so it wins)."""
        while not self._stop.is_set():
            try:
                first = self._desired_seen.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 10_000:
                    batch.append(self._desired_seen.get_nowait())
            if not self.leading:
                continue
            try:
                self._republish_stale(batch)
            except Exception:
                log.exception("checking the broker's desired states failed")

    def _republish_stale(self, batch: list[tuple[str, int]]) -> list[str]:
        """Publish again every device of ``batch`` (device, seq seen) whose last seen state is
        older than the stored one (or empty: a cleared retained copy); the devices published."""
        last = dict(batch)  # the last seen per device: what the broker retains
        stale = []
        for device, seen in last.items():
            stored = self.db.desired_seq(device)
            if seen < stored:
                stale.append(device)
                log.warning("the broker holds desired state seq %d for %s, the hub seq %d: publishing it again",
                            seen, device, stored)
                self.publish_desired(device)
        self.stale_desired_fixed += len(stale)
        self.desired_checked += len(batch)
        return stale

    @property
    def ingest_connected(self) -> bool:
        """Every ingest link is connected and subscribed."""
        return bool(self._ingest_links) and all(link.connected.is_set() for link in self._ingest_links)

    def _on_batch(self, messages: list[tuple[str, bytes]]) -> None:
        """An ingest link's batch into the inbox; blocks while it is full (backpressure)."""
        parse, put = self.topics.parse, self._inbox.put
        for topic, payload in messages:
            parsed = parse(topic)
            if parsed is None:
                continue
            item = (parsed[0], parsed[1], payload)
            while True:
                try:
                    put(item, timeout=0.5)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        raise RuntimeError("hub stopping with a full inbox") from None

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._inbox.get(timeout=max(0.05, self.drift.config.evaluate_seconds))]
            except queue.Empty:  # idle: score what arrived since the last (rate-limited) scoring
                self._score_drift()
                continue
            self._fill(batch)
            if len(batch) < INGEST_LINGER_BELOW and batch[-1][0]:
                # A trickle, or the first messages of a burst: let the network thread queue more
                # (sleeping, this thread leaves it the GIL) so that one transaction carries many.
                # Taken one by one, a backlog drained at a third of the rate.
                time.sleep(INGEST_LINGER)
                self._fill(batch)
            self._ingest_safely([b for b in batch if b[0]])

    def _fill(self, batch: list[tuple[str, str, bytes]]) -> None:
        while len(batch) < INGEST_BATCH:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break

    def _ingest_safely(self, batch: list[tuple[str, str, bytes]]) -> None:
        """Ingest a batch; if it fails as a whole, each message alone, so that one message that
        breaks the hub (a bug, not bad input: that is counted as malformed) loses only itself."""
        try:
            self.ingest(batch)
            return
        except Exception:
            if len(batch) == 1:
                with self._counters_lock:
                    self.counters["failed"] += 1
                log.exception("ingest of a %s message from %s failed; it is dropped", batch[0][1], batch[0][0])
                return
            log.exception("ingest of a batch of %d messages failed; retrying them one by one", len(batch))
        for msg in batch:
            self._ingest_safely([msg])

    def _score_drift(self) -> None:
        try:
            if self.drift.has_pending():
                with self.db.tx() as conn:
                    self.drift.flush(conn, force=True)
            self.drift.after_batch()
        except Exception:
            log.exception("drift scoring failed")

    def ingest(self, batch: list[tuple[str, str, bytes]]) -> None:
        """Store a batch of device messages in one transaction; bad ones are counted, dropped."""
        if not batch:
            return
        now = self.clock()
        known = self._known_devices({b[0] for b in batch})
        # Counts and drift sums are taken in only once the transaction commits (a failed batch
        # is retried message by message: nothing may count twice).
        counts = dict.fromkeys(self.counters, 0)
        staged: Staged = {}
        acks: dict[str, list[int]] = {}  # device -> telemetry seqs this batch has dealt with
        # Parsed and checked before the transaction: replicas parse while another one writes.
        messages: list[tuple[str, Any]] = []
        for device, channel, payload in batch:
            if device not in known:
                counts["unknown_device"] += 1
                continue
            if not payload:
                continue  # a cleared retained message
            try:
                msg = self._parse(device, channel, payload)
            except (EdgefleetError, ValueError) as exc:
                counts["malformed"] += 1
                log.warning("dropped %s message from %s: %s", channel, device, exc)
                if channel == "telemetry":  # never storable: acknowledged, or re-sent forever
                    seq = _seq_of(payload)
                    if seq is not None:
                        acks.setdefault(device, []).append(seq)
                continue
            if isinstance(msg, TelemetryWindow):
                acks.setdefault(device, []).append(msg.seq)
            messages.append((device, msg))
        windows = [(device, msg) for device, msg in messages if isinstance(msg, TelemetryWindow)]
        messages.sort(key=lambda m: m[0])  # stable: one device's messages keep their order
        # Not exclusive (hub.db.Database.tx): replicas ingest side by side; the drift sums, which
        # are read and rewritten, are merged in an exclusive transaction of their own below.
        with self.db.tx(exclusive=False) as conn:
            for device, msg in messages:
                self._store(conn, now, device, msg)
            # the batch's windows in a few statements; then what each new one adds
            for (device, tw), fresh in zip(windows, self.db.insert_telemetry_batch(conn, windows, now), strict=True):
                if not fresh:
                    counts["duplicates"] += 1
                    continue
                counts["ingested"] += 1
                self.rollouts.add_window(conn, device, tw, now)
                self.drift.stage(staged, device, tw)  # a window that breaks the sums fails the batch (retried one by one)
        self.drift.take(staged)
        self._ack_telemetry(acks)  # only once committed: an ack means the window is in the database
        if self.drift.flush_due():
            try:
                with self.db.tx() as conn:
                    self.drift.flush(conn)
            except Exception:  # the sums stay pending; the windows are stored and acknowledged
                log.exception("merging drift sums failed")
        with self._counters_lock:  # ingest workers finish batches concurrently
            for key, n in counts.items():
                self.counters[key] += n
        self.drift.after_batch()

    def _known_devices(self, wanted: set[str]) -> frozenset[str]:
        """Registered device ids, re-read at most every 5 s, or every 0.5 s while a message
        names a device not in the set (one registered by another hub replica, say)."""
        mono = time.monotonic()
        age = mono - self._known_at
        if self._known is None or age > 5.0 or (age > 0.5 and not wanted <= self._known):
            self._known, self._known_at = frozenset(self.db.device_ids()), mono
        return self._known

    def _ack_telemetry(self, acks: dict[str, list[int]]) -> None:
        """Tell each device which of its windows are stored (wire.TelemetryAck), so its spool lets
        them go; until then it re-sends them. Duplicates are acknowledged too.

        QoS 0: an acknowledgement is state, not an order. Agents subscribe at QoS 0
        (wire.SUBSCRIBE_QOS), so QoS 1 would only cover the hub-to-broker leg, and a lost one costs a
        re-sent window that is acknowledged again; at QoS 1 every one was a broker round trip (and on
        NATS a write to a replicated stream) per stored window batch per device."""
        for device, seqs in acks.items():
            for i in range(0, len(seqs), TelemetryAck.MAX_SEQS):
                ack = TelemetryAck(fleet=self.config.fleet, device=device, seqs=tuple(seqs[i:i + TelemetryAck.MAX_SEQS]))
                self._publish(self.topics.device(device, "acked"), ack.to_json(), False, qos=0)

    def _parse(self, device: str, channel: str, payload: bytes) -> TelemetryWindow | Reported | Status | Event:
        """One device message, checked against the contract (raises on anything malformed)."""
        obj = loads_object(payload)  # orjson; stricter than parse_json_object (see hub.fastjson)
        if obj.get("device") != device or obj.get("fleet") != self.config.fleet:
            raise MalformedMessage(f"payload names {obj.get('fleet')}/{obj.get('device')}, topic names {device}")
        kinds: dict[str, Any] = {"telemetry": TelemetryWindow, "reported": Reported, "status": Status, "events": Event}
        kind = kinds.get(channel)
        if kind is None:
            raise MalformedMessage(f"no such device channel {channel!r}")
        return kind.from_dict(obj)  # type: ignore[no-any-return]

    def _store(self, conn: Any, now: float, device: str, msg: TelemetryWindow | Reported | Status | Event) -> None:
        """Write one parsed message but a telemetry window (the batch's windows go together)."""
        if isinstance(msg, Reported):
            self.db.set_reported(conn, device, msg.to_dict(), msg.seq, msg.time, now)
        elif isinstance(msg, Status):
            self.db.set_status(conn, device, msg.state, now)
        elif isinstance(msg, Event):
            self.db.insert_event(conn, device, msg, now)
            self.rollouts.add_event(conn, device, msg, now)

    def _main_loop(self) -> None:
        """The controller's periodic work; on the other replicas it waits for its turn."""
        if self.leading:
            self._watch_keyring()
        while not self._stop.wait(60):
            if not self.leading:
                continue
            try:
                self.refresh_expiring()
            except Exception:
                log.exception("re-signing desired states failed")
            self._watch_keyring()
            try:
                self.prune_telemetry()
            except Exception:
                log.exception("telemetry retention failed")

    def prune_telemetry(self) -> int:
        """Delete the windows received more than ``telemetry_retention_days`` ago, a chunk per
        transaction so that ingest waits for none of them long; the number deleted."""
        days = self.config.telemetry_retention_days
        if days <= 0:
            return 0
        before, total = self.clock() - days * 86400, 0
        while not self._stop.is_set():
            n = self.db.prune_telemetry(before, PRUNE_CHUNK, fence=self.controller.fence)
            total += n
            if n < PRUNE_CHUNK:
                break
        if total:
            log.info("telemetry retention: deleted %d windows received before %s", total, format_time(before))
        return total

    # -- keyring expiry --------------------------------------------------------------------------

    def keyring_status(self) -> dict[str, Any]:
        """The published keyring's expiry (:func:`hub.core.desired.keyring_expiry`)."""
        ring = Keyring.from_dict(parse_json_object(open_envelope(self._keyring).payload, "keyring"))
        return keyring_expiry(ring, self.clock(), KEYRING_RENEW_DAYS)

    def _watch_keyring(self) -> None:
        """Warn ahead of the keyring's expiry: only a person with the root key can renew it. An
        ``edgefleet.alert/v1`` of type ``keyring`` on ``{root}hub/alerts`` when it enters
        ``renew`` or ``expired``, then once a day while it stays there; a log line each time."""
        try:
            info = self.keyring_status()
        except EdgefleetError:
            log.exception("the keyring at %s cannot be read", keyring_path(self.home))
            return
        now = self.clock()
        if info["state"] not in ("renew", "expired"):
            self._keyring_alert = None
            return
        last = self._keyring_alert
        if last is not None and last[0] == info["state"] and now - last[1] < KEYRING_ALERT_EVERY:
            return
        self._keyring_alert = (info["state"], now)
        log.warning("%s", info["message"])
        self.publish_alert({"kind": ALERT_KIND, "fleet": self.config.fleet, "time": format_time(now),
                            "type": "keyring", "state": info["state"], "keyring_version": info["version"],
                            "expires_at": format_time(info["expires_at"]), "days_left": info["days_left"],
                            "message": info["message"]})

    # -- operations (called by the admin API) ----------------------------------------------------

    def publish(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        name = _name(req.get("name"), "name")
        version = req.get("version")
        if not isinstance(version, str) or not version or len(version) > 128:
            raise BadRequest(f"version must be a non-empty string of at most 128 characters, got {version!r}")
        try:
            data = base64.b64decode(str(req.get("model_b64", "")), validate=True)
        except binascii.Error as exc:
            raise BadRequest(f"model_b64 is not base64: {exc}") from exc
        if not data:
            raise BadRequest("model_b64 is empty: expected the ONNX model bytes")
        inputs, outputs = validate_onnx(data)
        reference = req.get("reference")
        size = len(canonical_json(reference)) if reference is not None else 0
        if size > MAX_REFERENCE_BYTES:
            raise BadRequest(f"reference: {size:,} bytes, at most {MAX_REFERENCE_BYTES:,}: "
                             "every desired state carries it (and a message is at most 4 MiB); fewer bins, or "
                             "leave free-text columns out of the reference")
        if reference is not None:
            try:
                reference = Reference.from_dict(reference).to_dict()
            except EdgefleetError as exc:
                raise BadRequest(f"reference: {exc}") from exc
        preflight = accept_preflight(req.get("preflight"), data)  # the model must pass its own set
        sha = hashlib.sha256(data).hexdigest()
        existing = self.db.get_model(name, version)
        if existing is not None:
            if existing["sha256"] == sha:
                return {**_public_model(existing), "already_published": True}
            raise Conflict(
                f"{name} {version} is already published with sha256 {existing['sha256'][:16]}…, "
                f"these bytes hash to {sha[:16]}…; versions are immutable, publish a new version"
            )
        self.blob_store.put(sha, data)  # before the registry row: a row always has its blob
        if preflight is not None:
            self.blob_store.put(preflight[1]["sha256"], preflight[0])
        lineage = clean_lineage(req.get("lineage"))
        if lineage["parent"] is not None and self.db.get_model(name, lineage["parent"]) is None:
            raise NotFound(f"parent version {lineage['parent']!r} of {name} is not published; "
                           f"published: {self._versions(name) or 'none'}")
        now = self.clock()
        model: dict[str, Any] = {
            "name": name, "version": version, "sha256": sha, "size": len(data),
            "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs],
            "reference": reference, "lineage": {**lineage, "published_by": actor},
            "created_at": now,
        }
        with self.db.tx() as conn:
            self.db.insert_model(conn, model)
            if preflight is not None:
                self.db.insert_preflight(conn, name, version, preflight[1])
            self.db.audit(conn, model["created_at"], actor, "publish",
                          {"model": name, "version": version, "sha256": sha, "size": len(data),
                           "parent": lineage["parent"], "source": lineage.get("source"),
                           "training_data_sha256": lineage.get("training_data_sha256")})
        log.info("published %s %s (%s, %d bytes)", name, version, sha[:12], len(data))
        return {**_public_model(model), "already_published": False,
                "preflight": preflight[1] if preflight is not None else None}

    def add_device(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Register a device and issue its credentials, all or nothing: what can fail without
        changing anything (names, the root public key, the broker URL) is checked first, and if
        anything fails once credentials are issued they are taken back and the registration
        rolls back. The answer carries ``enrolment``, a secret with which the enrolling CLI
        cancels the enrolment (``{"device", "cancel": enrolment}``) when it cannot write the
        bundle, for :data:`ENROLMENT_CANCEL_SECONDS`, while the device has never been seen."""
        if "cancel" in req:
            return self.cancel_enrolment(req, actor)
        device = _name(req.get("device"), "device id")
        profile = req.get("profile", "generic-x86_64")
        if not isinstance(profile, str) or not profile:
            raise BadRequest(f"profile must be a profile name, got {profile!r}")
        group = check_group(req.get("group"))
        root_public = self.home.root_public_b64()  # keys/root.pub: the root private key may be offline
        now = self.clock()
        creds: dict[str, Any] | None = None
        try:
            with self.db.tx() as conn:
                if self.db.device_registered(conn, device):
                    raise Conflict(f"device {device!r} is already registered")
                creds = issue_credentials(self.home, self.config, self.broker_url, device,
                                          req.get("credentials", "auto"), now)
                # Data-capture uploads authenticate with this token (only its hash is kept).
                creds["capture_token"] = token = secrets.token_urlsafe(32)
                self.db.insert_device(conn, device, profile, now, group, hashlib.sha256(token.encode()).hexdigest())
                self.db.audit(conn, now, actor, "device_add",
                              {"device": device, "profile": profile, "credentials": creds["kind"],
                               "serial": creds.get("serial"), "group": group})
                answer = {
                    "fleet": self.config.fleet,
                    "device": device,
                    "broker_url": device_broker_url(self.config, self.broker_url, creds["kind"]),
                    "blob_url": self.public_url,
                    "root_public_key": root_public,
                    "credentials": creds,
                }
        except BaseException:
            if creds is not None:
                undo_credentials(self.home, self.config, device, serial=creds.get("serial"),
                                 password="password" in creds)
            raise
        self._known = None  # the ingest thread re-reads the registered devices
        secret = secrets.token_urlsafe(24)
        with self._enrol_lock:
            self._enrolments = {d: e for d, e in self._enrolments.items()
                                if now - e.at <= ENROLMENT_CANCEL_SECONDS}
            self._enrolments[device] = _Enrolment(hashlib.sha256(secret.encode()).hexdigest(), now,
                                                  creds.get("serial"), "password" in creds)
        return {**answer, "enrolment": secret}

    def cancel_enrolment(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Undo an enrolment whose bundle could not be written: the registration goes, the
        certificate and password are taken back, the id is free again (an audit entry says so)."""
        device = _name(req.get("device"), "device id")
        secret = req.get("cancel")
        now = self.clock()
        with self._enrol_lock:
            pending = self._enrolments.get(device)
            if pending is None or not isinstance(secret, str) or not hmac.compare_digest(
                    hashlib.sha256(secret.encode()).hexdigest(), pending.secret_sha256):
                raise NotAuthorized(f"no enrolment of {device!r} to cancel with this secret (only the "
                                    "`device add` that enrolled it can cancel it)")
            if now - pending.at > ENROLMENT_CANCEL_SECONDS:
                raise Conflict(f"the enrolment of {device!r} is older than {ENROLMENT_CANCEL_SECONDS:.0f} s "
                               "and can no longer be cancelled; revoke the device instead")
            with self.db.tx() as conn:
                if not self.db.delete_unseen_device(conn, device):
                    raise Conflict(f"device {device!r} has been seen or deployed to since its enrolment; "
                                   "revoke it instead")
                self.db.audit(conn, now, actor, "device_add_cancelled",
                              {"device": device, "serial": pending.serial})
            del self._enrolments[device]
        undo_credentials(self.home, self.config, device, serial=pending.serial, password=pending.password)
        self._known = None
        return {"device": device, "cancelled": True}

    def deploy(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        name = _name(req.get("model"), "model name")
        version = req.get("version")
        devices = deploy_targets(self.db, req)  # --device and every device of each --group
        if self.db.get_model(name, str(version)) is None:
            versions = [m["version"] for m in self.db.list_models() if m["name"] == name]
            raise NotFound(f"model {name} has no version {version!r}; published: {versions or 'none'}")
        known = self.db.device_ids()
        missing = [d for d in devices if d not in known]
        if missing:
            raise NotFound(f"unknown device(s) {missing}; add them with `edgefleet-hub device add`")
        out = {}
        # A transaction per chunk, not per device: 10,000 commits would queue behind the ingest
        # thread's batches one by one. The states are published once all are stored, as the
        # fleet rollback does: published chunk by chunk, the devices' work and reports competed
        # with the signing (10,000 devices: API call 6.3 s, all converged 19.9 s; published at
        # the end: 2.7 s and 19.5 s).
        for i in range(0, len(devices), DEPLOY_CHUNK):
            chunk = devices[i:i + DEPLOY_CHUNK]
            now = self.clock()
            with self.db.tx() as conn:
                for device in chunk:
                    out[device] = self._assign(conn, device, name, str(version), actor, now)
        for device in devices:
            self.publish_desired(device)
        return {"model": name, "version": version, "devices": out}

    def _assign_one(self, device: str, name: str, version: str, actor: str, fenced: bool = False) -> dict[str, Any]:
        """Assign, sign, store and publish one device's new state in a transaction of its own
        (*fenced*: the controller's decision, written only while this replica leads)."""
        with self.db.tx() as conn:
            if fenced:
                self.controller.fence(conn)
            out = self._assign(conn, device, name, version, actor, self.clock())
        self.publish_desired(device)
        return out

    def _assign(self, conn: Any, device: str, name: str, version: str, actor: str, now: float) -> dict[str, Any]:
        row = self.db.assignment(conn, device, name)
        previous = row["version"] if row else None
        if previous != version:
            self.db.set_assignment(conn, device, name, version, previous)
        seq = self.sign_and_store(conn, device, now)
        self.db.audit(conn, now, actor, "deploy",
                      {"device": device, "model": name, "version": version, "previous": previous, "seq": seq})
        return {"seq": seq, "previous": previous}

    def sign_and_store(self, conn: Any, device: str, now: float) -> int:
        """Sign the device's next desired state (seq + 1) from its assignments and store it in *conn*'s
        transaction; publish it with :meth:`publish_desired` after the commit."""
        entries: dict[str, ModelEntry] = {}
        for m in self.db.assigned_models(conn, device):
            entries[m["model"]] = model_entry(m, self.public_url, m["previous"])
        entries = self.rollouts.adjust(conn, device, entries, now)
        seq = self.db.next_desired_seq(conn, device)
        _state, raw = build_desired(
            fleet=self.config.fleet, device=device, seq=seq, now=now,
            ttl=self.config.desired_ttl_seconds, models=entries, signing_key=self.signing_key,
        )
        self.db.store_desired(conn, device, seq, raw.decode(), now, now + self.config.desired_ttl_seconds)
        return seq

    def publish_desired(self, device: str) -> None:
        """Publish the stored desired state of *device* (retained); nothing without a broker link."""
        with self._desired_publish:  # read and publish as one step (see _on_connect)
            envelope = self.db.desired_envelope(device)
            if envelope is not None and self.link is not None:
                self.link.publish(self.topics.desired(device), envelope.encode(), qos=1, retain=True)

    def publish_alert(self, alert: dict[str, Any]) -> None:
        """Publish an alert on ``{root}hub/alerts`` (a stream: QoS 1, not retained)."""
        if self.link is not None:
            self.link.publish(self.topics.alerts, canonical_json(alert), qos=1, retain=False)

    def drift_policy(self, model: str) -> DriftPolicy:
        """The drift thresholds for *model* (``drift.toml``), for the rollout gates."""
        return self.drift.config.policy(model)

    @property
    def fleet(self) -> str:
        return self.config.fleet

    def refresh_expiring(self) -> list[str]:
        """Re-sign (with a new seq) every desired state past half its lifetime."""
        now = self.clock()
        half = self.config.desired_ttl_seconds / 2
        due = self.db.expiring_desired(now, half)
        for device in due:
            with self.db.tx() as conn:
                self.controller.fence(conn)
                self.sign_and_store(conn, device, now)
            self.publish_desired(device)
        return due

    def status(self, limit: int | None = None, after: str = "") -> dict[str, Any]:
        """One page of the fleet's status: up to *limit* (default :data:`STATUS_PAGE`) devices with
        ids after *after*, by id; ``next`` is the cursor of the following page (``None`` on the
        last), ``total`` the fleet's size. A page costs the same whatever the fleet's size."""
        limit = STATUS_PAGE if limit is None else limit
        if not isinstance(limit, int) or not 1 <= limit <= STATUS_PAGE_MAX:
            raise BadRequest(f"limit must be an integer from 1 to {STATUS_PAGE_MAX}, got {limit!r}")
        rows = self.db.devices_page(after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        devices = []
        for d in rows:
            reported = json.loads(d["reported"]) if d["reported"] else None
            last = self.db.last_telemetry(d["id"])
            assigned = self.db.device_assignments(d["id"])
            devices.append({
                "device": d["id"],
                "profile": d["profile"],
                "group": group_of(d),
                "status": d["status"] or "never seen",
                "status_at": format_time(d["status_at"]) if d["status_at"] else None,
                "desired": {a["model"]: a["version"] for a in assigned},
                "desired_seq": self.db.desired_seq(d["id"]),
                "reported_seq": reported["seq"] if reported else None,
                "models": {n: m["version"] for n, m in (reported or {}).get("models", {}).items()},
                # a canary the device runs beside the stable model (rollouts): version and mode
                "candidates": {n: m["candidate"] for n, m in (reported or {}).get("models", {}).items()
                               if isinstance(m.get("candidate"), dict)},
                "last_telemetry": {
                    "seq": last["seq"],
                    "window_start": format_time(last["window_start"]),
                    "window_end": format_time(last["window_end"]),
                    "metrics": last["metrics"],
                } if last else None,
                "telemetry_totals": self.db.telemetry_totals(d["id"]),
            })
        return {"fleet": self.config.fleet, "hub_version": __version__, "devices": devices,
                "total": self.db.device_count(), "next": rows[-1]["id"] if more else None,
                "counters": dict(self.counters), "keyring": self.keyring_status(),
                "controller": self.controller.describe(), "database": {"engine": self.db.engine}}

    def events(self, device: str | None, limit: int) -> list[dict[str, Any]]:
        rows = self.db.events(device, limit)
        for r in rows:
            r["time"] = format_time(r["time"])
            r["received_at"] = format_time(r["received_at"])
        return rows

    def models(self) -> list[dict[str, Any]]:
        return [_public_model(m) for m in self.db.list_models()]

    # -- registry lineage and tracing (hub.lineage) ----------------------------------------------

    def _versions(self, name: str) -> list[str]:
        return [m["version"] for m in self.db.list_models() if m["name"] == name]

    def model(self, name: str, version: str | None = None) -> dict[str, Any]:
        """One version with its reference and lineage; the newest when ``version`` is None."""
        if version is None:
            versions = self._versions(name)
            if not versions:
                raise NotFound(f"no model named {name!r} is published")
            version = versions[-1]
        m = self.db.get_model(name, version)
        if m is None:
            raise NotFound(f"model {name} has no version {version!r}; published: {self._versions(name) or 'none'}")
        return {**_public_model(m), "reference": m["reference"]}

    def model_diff(self, name: str, a: str, b: str) -> dict[str, Any]:
        return diff_versions(self.model(name, a), self.model(name, b))

    def capture_device(self, authorization: str) -> str:
        """The device a data-capture upload comes from, known from its ``Authorization: Bearer
        <capture token>`` alone (issued at enrolment, only its hash kept, cleared by revocation),
        so the admin API checks it before it reads the body."""
        token = authorization[len("Bearer "):].strip() if authorization.startswith("Bearer ") else ""
        device = self.db.device_by_capture_token(hashlib.sha256(token.encode()).hexdigest()) if token else None
        if device is None:
            raise NotAuthorized(
                "capture upload refused: missing or wrong capture token, or its device was revoked or "
                "enrolled before capture tokens existed (enrol it again); send Authorization: Bearer "
                "<capture.token from the device's bundle>")
        return device

    def ingest_capture(self, device: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store a capture batch from ``device`` (:meth:`capture_device`): the batch must name this
        fleet, that device, and published versions with their sha256."""
        try:
            fleet, named, records = parse_batch(body)
        except MalformedMessage as exc:
            raise BadRequest(f"capture batch: {exc}") from exc
        if fleet != self.config.fleet:
            raise BadRequest(f"capture batch names fleet {fleet!r}; this hub serves {self.config.fleet!r}")
        if named != device:
            raise NotAuthorized(f"capture upload for {named!r}: missing or wrong capture token (the token "
                                f"sent is another device's; use the capture.token from {named!r}'s bundle)")
        shas = {(m["name"], m["version"]): m["sha256"] for m in self.db.list_models()}
        bad = [r for r in records if shas.get((r["model"], r["version"])) != r["sha256"]]
        if bad:
            r = bad[0]
            raise BadRequest(f"capture record {r['request_id']}: {r['model']} {r['version']} with sha256 "
                             f"{r['sha256'][:12]}… is not a published version")
        with self.db.tx() as conn:
            stored = self.db.insert_captures(conn, device, records, self.clock())
        return {"received": len(records), "stored": stored}

    def trace(self, device: str, request_id: str) -> dict[str, Any]:
        """A captured prediction with its model's lineage and the decision that put it there."""
        caps = self.db.get_captures(device, request_id)
        if not caps:
            raise NotFound(f"no captured request {request_id!r} from device {device!r} (is capture on "
                           "in its profile, sampled, and uploaded yet?)")
        out = []
        entries = self.db.audit_entries()
        for c in caps:
            m = self.db.get_model(c["model"], c["version"])
            decision = find_decision(entries, device, c["model"], c["version"], c["time"])
            out.append({
                "record": {**c, "time": format_time(c["time"]), "received_at": format_time(c["received_at"])},
                "model": {**_public_model(m), "reference": m["reference"]} if m else None,
                "decision": {**decision, "time": format_time(decision["time"])} if decision else None,
            })
        problems = self.db.verify_audit()
        return {"device": device, "request_id": request_id, "traces": out,
                "audit_chain_ok": not problems, "audit_problems": problems}

    # -- API tokens (hub.core.access, hub.adapters.tokens) ----------------------------------------

    def list_tokens(self) -> list[dict[str, Any]]:
        return [_public_token(t) for t in self.tokens.tokens()]

    def add_token(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """A new named token; its secret is in the answer and nowhere else."""
        name, role = check_token_name(req.get("name")), check_role(req.get("role"))
        now = self.clock()
        with self.db.tx() as conn:  # the audit entry is rolled back if the token file is not written
            self.db.audit(conn, now, actor, "token_add", {"name": name, "role": role})
            token, secret = self.tokens.add(name, role, now, actor, conn)
        return {**_public_token(token), "token": secret}

    def revoke_token(self, name: str, actor: str) -> dict[str, Any]:
        now = self.clock()
        with self.db.tx() as conn:
            self.db.audit(conn, now, actor, "token_revoke", {"name": name})
            token = self.tokens.revoke(name, now, conn)
        return _public_token(token)

    def blob_location(self, sha256: str) -> Path | str | None:
        """``GET /blobs/{sha256}``: a file to serve, a (pre-signed) URL to redirect to, or None."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            return None
        return self.blob_store.location(sha256)

    # -- the rest of the admin API's port (hub.adapters.api.Admin): the services that serve it ---

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus page (:mod:`hub.services.metrics`)."""
        return render_metrics(fleet=self.config.fleet, db=self.db, counters=dict(self.counters),
                            drift=self.drift.last_reports(), rollouts=self.rollouts.status(),
                            controller=self.controller.describe())

    def audit_entries(self, since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        if limit is not None and not 1 <= limit <= 100_000:
            raise BadRequest(f"limit must be 1-100000 entries, got {limit}")
        return self.db.audit_entries(since, limit)

    def verify_audit(self) -> list[str]:
        return self.db.verify_audit()

    def drift_snapshot(self, model: str | None = None) -> dict[str, Any]:
        return self.drift.snapshot(model)

    def drift_view(self, model: str, version: str | None = None) -> dict[str, Any]:
        return self.drift.view(model, version)

    def device_telemetry(self, device: str, limit: int) -> dict[str, Any]:
        """The device's newest *limit* (1-1000) windows, oldest first, for the device page."""
        if not 1 <= limit <= 1000:
            raise BadRequest(f"limit must be 1-1000 windows, got {limit}")
        if device not in self.db.device_ids():
            raise NotFound(f"no device {device!r}")
        windows = self.db.recent_telemetry(device, limit)
        for w in windows:
            w["window_start"], w["window_end"] = format_time(w["window_start"]), format_time(w["window_end"])
        return {"device": device, "windows": windows}

    def list_devices(self) -> list[dict[str, Any]]:
        return list_devices(self.db, self.home, self.config)

    def revoke_device(self, device: str, actor: str) -> dict[str, Any]:
        return revoke_device(self.db, self.home, self.config, device, actor, self.clock)

    def rollout_status(self, key: str | None = None) -> list[dict[str, Any]]:
        return self.rollouts.status(key)

    def start_rollout(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        return self.rollouts.start_rollout(req, actor)

    def rollout_action(self, action: str, key: str | None, actor: str, reason: str = "") -> dict[str, Any]:
        return self.rollouts.act(action, key, actor, reason)

    def fleet_rollback(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        return self.rollouts.fleet_rollback(req, actor)


PRUNE_CHUNK = 5000  # windows deleted per transaction by the retention
DEPLOY_CHUNK = 250  # devices signed and stored per transaction by a deploy
STATUS_PAGE = 500  # devices per status page unless the caller asks for another size
STATUS_PAGE_MAX = 5000


def _seq_of(payload: bytes) -> int | None:
    """The ``seq`` of a telemetry window that could not be stored, if it has a usable one."""
    try:
        seq = loads_object(payload).get("seq")
    except (EdgefleetError, ValueError):
        return None
    return seq if type(seq) is int and seq >= 1 else None


def _name(value: object, what: str) -> str:
    try:
        return check_name(value, what)
    except MalformedMessage as exc:
        raise BadRequest(str(exc)) from exc


def _public_token(t: Token) -> dict[str, Any]:
    return {**t.public(), "created_at": format_time(t.created_at),
            "revoked_at": format_time(t.revoked_at) if t.revoked_at is not None else None}


def _public_model(m: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": m["name"], "version": m["version"], "sha256": m["sha256"], "size": m["size"],
        "inputs": m["inputs"], "outputs": m["outputs"],
        "has_reference": bool(m.get("reference")), "lineage": m["lineage"],
        "created_at": format_time(m["created_at"]),
    }


