"""The agent daemon: wires the pure core to MQTT, HTTP, disk and ONNX Runtime.

Threads, each named: ``agent-main`` (the only writer of the store: applies keyrings and desired
states, closes telemetry windows), paho's network thread (puts messages on the inbox, never
blocks), and ``oip-http`` (serves inference). Lifecycle: NEW -> STARTING -> SERVING -> STOPPING
-> STOPPED. On start the installed models are verified and served *before* the broker is
reached, so a device that reboots without network keeps answering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent import __version__
from edgefleet.agent.adapters.capture import make_capture
from edgefleet.agent.adapters.fetch import Fetcher, HttpFetcher
from edgefleet.agent.adapters.mqttlink import MqttLink
from edgefleet.agent.adapters.oip import OipServer
from edgefleet.agent.adapters.sandbox import SessionGuard
from edgefleet.agent.adapters.spool import Outbox, Spool
from edgefleet.agent.adapters.store import Store
from edgefleet.agent.adapters.sysstat import (
    SystemProbe,
    disk_free_bytes,
    release_free_heap,
    rss_bytes,
    temperature_c,
)
from edgefleet.agent.app.heartbeat import Heartbeat
from edgefleet.agent.app.serving import ModelServer
from edgefleet.agent.app.updater import StepHook, Updater
from edgefleet.agent.contract.broker import client_id
from edgefleet.agent.contract.config import AgentConfig
from edgefleet.agent.contract.envelope import public_key_from_b64
from edgefleet.agent.contract.errors import EdgefleetError, StoreFailed
from edgefleet.agent.contract.wire import (
    SUBSCRIBE_QOS,
    Event,
    ModelReport,
    ModelWindow,
    Reported,
    Status,
    TelemetryAck,
    TelemetryWindow,
    Topics,
    format_time,
    parse_json_object,
)
from edgefleet.agent.core.telemetry import fold
from edgefleet.agent.core.trust import TrustedState
from edgefleet.agent.core.update import Note

__all__ = ["Agent", "AgentState"]

log = logging.getLogger("edgefleet.agent")

# Crash tests: the agent pauses at one update step (agent.app.updater.STEPS) so a test can kill it there.
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "EDGEFLEET_TEST_PAUSE_MARKER"


def _pause_hook_from_env(state_dir: Path) -> StepHook | None:
    """Test hook: with ``EDGEFLEET_TEST_PAUSE_AT=<step>`` the agent writes a marker file and
    sleeps at that step, so a test can SIGKILL it there. Unset in production: returns ``None``."""
    step = os.environ.get(PAUSE_ENV)
    if not step:
        return None
    marker = Path(os.environ.get(PAUSE_MARKER_ENV) or state_dir / f"paused-{step}")

    def hook(at: str) -> None:
        if at == step:
            marker.write_text(f"{os.getpid()}\n")
            log.warning("test hook: paused at %s (pid %d)", at, os.getpid())
            while True:
                time.sleep(3600)

    return hook

Clock = Callable[[], float]
# An update that failed for a reason that may pass (network, a mirror sending other bytes than
# signed) is retried after 5 s, then 10, 20, ... up to 15 min, with +-25 % jitter so a fleet
# behind one broken mirror does not come back in lockstep.
RETRY_SECONDS = 5.0
RETRY_MAX_SECONDS = 900.0


def retry_delay(failures: int, rng: random.Random) -> float:
    """Seconds before retry number ``failures`` (1 = the first)."""
    base = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2.0 ** max(0, failures - 1))
    return base * rng.uniform(0.75, 1.25)


class AgentState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock = time.time,
        fetcher: Fetcher | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.state = AgentState.NEW
        self.topics = Topics(config.fleet, prefix=config.topic_prefix)
        self.store = Store(config.state_dir)
        self.models = ModelServer()
        self._notify = notify or (lambda _msg: None)
        self.heartbeat = Heartbeat(self._notify, interval=getattr(self._notify, "watchdog_interval", None),
                                   alive=lambda: self.http is not None and self.http.alive)
        # ca_file pins https blobs; every chunk received tells the heartbeat the download moves.
        self.fetcher: Fetcher = fetcher or HttpFetcher(**config.fetch_options(), on_progress=self.heartbeat.progress)
        self.trust = TrustedState(
            root=public_key_from_b64(config.root_public_key),
            fleet=config.fleet,
            device=config.device,
            max_blob_bytes=config.profile.max_blob_bytes,
        )
        profile = config.profile
        self.updater = Updater(
            store=self.store,
            trust=self.trust,
            fetcher=self.fetcher,
            profile=profile,
            server=self.models,
            guard=SessionGuard(budget_mb=profile.memory_budget_mb,
                               threads=profile.intra_op_threads,
                               opt_level=profile.graph_optimization_level),
            on_step=self._on_step,
        )
        self._pause_hook = _pause_hook_from_env(config.state_dir)
        self._startup_notes: list[Note] = []
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        # A candidate dropped by the local guard (agent.canary) wakes the main loop to report it.
        self.updater.wake = lambda: self._inbox.put(("canary", b""))
        self._stop = threading.Event()
        self._retry_at: float | None = None
        self._failures = 0  # consecutive retryable failures of the pending update
        self._stale_reported: frozenset[str] = frozenset()  # TrustedState.stale_reasons already reported
        self._rng = random.Random()
        self._telemetry_seq = 0
        self._window_start = clock()
        # Telemetry store-and-forward (agent.spool): every window hits the disk before MQTT.
        self.spool = Spool(config.state_dir / "spool", max_bytes=max(1, int(config.profile.spool_mb * 2**20)))
        self.outbox = Outbox(resend_after=config.profile.resend_seconds)
        # Set once the hub has acknowledged a window (wire.TelemetryAck): from then on a window
        # leaves the spool when the hub stored it, not when the broker took it (persisted).
        self._hub_acks = False
        self._store_failing = False  # the last state write failed (disk full): reported once
        self._probe = SystemProbe()
        self._thread: threading.Thread | None = None
        self.http: OipServer | None = None
        self.link: MqttLink | None = None
        self.capture = make_capture(config, clock)
        self.models.capture = self.capture

    def _on_step(self, step: str) -> None:
        self.heartbeat.progress()
        if self._pause_hook is not None:
            self._pause_hook(step)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.state = AgentState.STARTING
        self._restore()
        host, _, port = self.config.listen.rpartition(":")
        self.http = OipServer(self.models, host or "127.0.0.1", int(port))
        self.http.start()
        if self.capture is not None:
            self.capture.start()
        self.state = AgentState.SERVING
        release_free_heap()
        self._notify(f"READY=1\nSTATUS={self.status_line()}")
        self.link = MqttLink(
            url=self.config.broker_url,
            client_id=client_id("agent", self.config.fleet, self.config.device),
            subscriptions=[(t, SUBSCRIBE_QOS) for t in (self.topics.roots, self.topics.keyring,
                                                          self.topics.desired(self.config.device),
                                                          self.topics.device(self.config.device, "acked"))],
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_publish=self._on_publish,
            will=(self.topics.device(self.config.device, "status"), self._status("offline"), 1, True),
            **self.config.mqtt_options(),
        )
        self.link.start()
        for note in self._startup_notes:
            self._emit(note)
        if self.updater.pending is not None:
            self._inbox.put(("resume", b""))
        self._thread = threading.Thread(target=self._main, name="agent-main", daemon=True)
        self._thread.start()
        self.heartbeat.start()
        log.info(
            "agent %s/%s serving %s on http://%s:%d",
            self.config.fleet, self.config.device, self.status_line(), *self.http.address,
        )

    def stop(self) -> None:
        self.state = AgentState.STOPPING
        self._notify("STOPPING=1")
        self._stop.set()
        self.heartbeat.stop()
        if self._thread is not None:
            self._thread.join(10)
        self.updater.stop_canaries()
        if self.link is not None:
            status = self.topics.device(self.config.device, "status")
            self.link.stop(last=(status, self._status("offline"), 1, True))
        if self.http is not None:
            self.http.stop()
        if self.capture is not None:
            self.capture.stop()
        self.state = AgentState.STOPPED

    def status_line(self) -> str:
        served = self.models.models()
        line = ", ".join(f"{n} {m.version}" for n, m in sorted(served.items())) or "no model installed"
        for reason in self.trust.stale_reasons(self.clock()):
            if reason == "expired":
                line += f"; trust stale: desired seq {self.trust.last_seq} expired, no newer state"
            elif reason == "keyring_expired" and self.trust.keyring is not None:
                line += f"; trust stale: keyring v{self.trust.keyring.version} expired, no renewed keyring"
        return line

    def _check_trust_fresh(self) -> None:
        """Once per window: what the device trusts past its expiry (the applied desired state, the
        keyring) keeps serving, but not silently: one ``trust_stale`` event per reason, when it
        becomes stale."""
        reasons = frozenset(self.trust.stale_reasons(self.clock()))
        for reason in sorted(reasons - self._stale_reported):
            if reason == "expired":
                expired = format_time(self.trust.applied_expires_at or 0.0)
                self._event("trust_stale", None, reason="expired", seq=self.trust.last_seq,
                            message=f"the applied desired state (seq {self.trust.last_seq}) expired at {expired} "
                                    "and no newer one has arrived: the hub is down or cut off, or updates are "
                                    "being withheld. The installed models keep serving")
            elif reason == "keyring_expired" and self.trust.keyring is not None:
                ring = self.trust.keyring
                self._event("trust_stale", None, reason="keyring_expired", seq=self.trust.last_seq,
                            keyring_version=ring.version,
                            message=f"the trusted keyring (v{ring.version}) expired at "
                                    f"{format_time(ring.expires_at or 0.0)} and no renewed one has arrived: "
                                    "the fleet's root key holder must renew it (edgefleet-hub keys "
                                    "renew-keyring), or a renewed keyring is being withheld. States its keys "
                                    "sign are still accepted and the installed models keep serving")
        if reasons - self._stale_reported:
            self._notify(f"STATUS={self.status_line()}")
        self._stale_reported = reasons

    # -- restore ---------------------------------------------------------------------------------

    def _restore(self) -> None:
        self._startup_notes = self.updater.restore()
        self._telemetry_seq = max(int(self.updater.extra.get("telemetry_seq", 0)), self.spool.max_seq())
        self._hub_acks = bool(self.updater.extra.get("hub_acks", False))

    def _persist(self) -> None:
        self.updater.extra["telemetry_seq"] = self._telemetry_seq
        if self._hub_acks:
            self.updater.extra["hub_acks"] = True
        self.updater.persist()

    # -- MQTT (network thread: enqueue only) -----------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic == self.topics.keyring:
            self._inbox.put(("keyring", payload))
        elif topic == self.topics.roots and payload:
            self._inbox.put(("roots", payload))
        elif topic == self.topics.desired(self.config.device) and payload:
            self._inbox.put(("desired", payload))
        elif topic == self.topics.device(self.config.device, "acked") and payload:
            self._inbox.put(("hub_acked", payload))

    def _on_connect(self) -> None:
        self._inbox.put(("connected", b""))

    def _on_publish(self, mid: int) -> None:
        self._inbox.put(("acked", str(mid).encode()))

    # -- main loop -------------------------------------------------------------------------------

    def _main(self) -> None:
        window = self.config.profile.window_seconds
        next_window = time.monotonic() + window
        while not self._stop.is_set():
            timeout = max(0.0, next_window - time.monotonic())
            if self._retry_at is not None:
                timeout = min(timeout, max(0.0, self._retry_at - time.monotonic()))
            try:
                kind, payload = self._inbox.get(timeout=min(timeout, self._turn_seconds()))
            except queue.Empty:
                kind, payload = "", b""
            try:
                with self.heartbeat.busy():  # a long step that progresses keeps the watchdog fed
                    if kind == "keyring":
                        self._handle_keyring(payload)
                    elif kind == "roots":
                        self._emit_all(self.updater.handle_roots(payload, now=self.clock()))
                    elif kind == "desired":
                        self._emit_all(self.updater.offer(payload, now=self.clock()))
                    elif kind == "resume":
                        self._try_desired()
                    elif kind == "connected":
                        self._publish_presence()
                    elif kind == "acked":
                        self._spool_acked(int(payload))
                    elif kind == "hub_acked":
                        self._hub_acked(payload)
                    self._emit_all(self.updater.poll_canary())
                    if self._retry_at is not None and time.monotonic() >= self._retry_at:
                        self._retry_at = None
                        self._try_desired()
                if time.monotonic() >= next_window:
                    next_window += window
                    self._close_window()
                    self._check_trust_fresh()
                self._pump_spool()
                # Keep-alives only while inference is served: otherwise systemd restarts us.
                if self.http is not None and self.http.alive:
                    self._notify("WATCHDOG=1")
            except Exception as exc:  # the loop must outlive any single failure, and say so
                log.exception("unexpected error in the agent main loop")
                with contextlib.suppress(Exception):
                    self._event("agent_error", None, reason="internal_error",
                                message=f"{type(exc).__name__}: {exc} (in the agent's main loop; see its journal)")

    def _turn_seconds(self) -> float:
        """Longest wait per loop turn: 1 s, or less when systemd's watchdog wants pings sooner."""
        interval = getattr(self._notify, "watchdog_interval", None)
        return min(1.0, interval) if interval else 1.0

    def _handle_keyring(self, raw: bytes) -> None:
        self._emit_all(self.updater.handle_keyring(raw, now=self.clock()))

    def _try_desired(self) -> None:
        self._emit_all(self.updater.retry(now=self.clock()))

    def _emit_all(self, notes: list[Note]) -> None:
        """Publish what the updater reports; schedule a retry when a download was unavailable."""
        for note in notes:
            self._emit(note)
            if note.model and note.type == "update":
                served = self.models.models().get(note.model)
                missing = list(served.missing_providers) if served is not None else []
                if missing:
                    self._event("provider_fallback", None, model=note.model,
                                message=f"execution providers not available here: {missing}")
        if any(n.extra.get("retrying") for n in notes):
            self._failures += 1
            self._retry_at = time.monotonic() + retry_delay(self._failures, self._rng)
        elif any(n.type in ("update", "noop", "refused", "removed") for n in notes):
            self._failures = 0
        # Every applied desired state is reported, also one that only starts, retunes or ends a
        # canary (the stable did not change, but the hub must see the seq and the candidate).
        if any(n.type in ("update", "removed", "rollback", "noop", "canary_started", "canary_ended",
                          "canary_dropped", "preflight_failed") for n in notes):
            self._publish_reported()
            self._notify(f"STATUS={self.status_line()}")

    def _emit(self, note: Note) -> None:
        self._event(note.type, None, model=note.model, version=note.version, seq=note.seq,
                    message=note.message, reason=note.reason, **note.extra)

    # -- publishing ------------------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        return Status(fleet=self.config.fleet, device=self.config.device, state=state,
                      agent_version=__version__).to_json()

    def _publish(self, channel: str, payload: bytes, *, retain: bool = False) -> None:
        if self.link is not None:
            self.link.publish(self.topics.device(self.config.device, channel), payload, qos=1, retain=retain)

    def _publish_presence(self) -> None:
        self._publish("status", self._status("online"), retain=True)
        self._publish_reported()

    def _publish_reported(self) -> None:
        rep = Reported(
            fleet=self.config.fleet,
            device=self.config.device,
            seq=self.trust.last_seq,
            time=self.clock(),
            models={
                n: ModelReport(version=m.version, sha256=m.entry.sha256,
                               state=self.updater.model_state(n), extra=self._candidate(n))
                for n, m in self.models.models().items()
            },
            agent_version=__version__,
        )
        self._publish("reported", rep.to_json(), retain=True)

    def _candidate(self, name: str) -> dict[str, Any]:
        """``{"candidate": {version, sha256, mode}}`` while a canary runs beside ``name``."""
        hook = self.models.canaries().get(name)
        if hook is None:
            return {}
        return {"candidate": {"version": hook.version, "sha256": hook.sha256, "mode": hook.mode}}

    def _event(self, type_: str, exc: EdgefleetError | None, *, model: str | None = None,
               version: str | None = None, seq: int | None = None, message: str = "",
               reason: str = "", **extra: Any) -> None:
        ev = Event(
            fleet=self.config.fleet,
            device=self.config.device,
            time=self.clock(),
            type=type_,
            reason=exc.reason if exc else reason,
            message=str(exc) if exc else message,
            model=model,
            version=version,
            seq=seq,
            extra=extra,
        )
        routine = type_ in ("noop", "canary_started", "canary_ended")  # reasons that are not trouble
        (log.warning if exc or (reason and not routine) else log.info)(
            "%s%s: %s", type_, f" [{ev.reason}]" if ev.reason else "", ev.message
        )
        self._publish("events", ev.to_json())

    def _close_window(self) -> None:
        now = self.clock()
        windows: dict[str, ModelWindow] = {}
        for name, model in self.models.models().items():
            windows[name] = fold(model.recorder.swap(), model.entry.reference)
        cpu_wait = self._probe.cpu_wait_share()
        for name, canary in self.updater.canary_windows(cpu_wait).items():
            if name in windows:
                windows[name] = dataclasses.replace(windows[name], canary=canary)
        self._telemetry_seq += 1
        release_free_heap()  # before rss_bytes: the window's folding freed its arrays
        system = {
            "process_cpu_percent": self._probe.process_cpu_percent(),
            "rss_bytes": float(rss_bytes()),
            "system_cpu_percent": self._probe.system_cpu_percent(),
            **({} if cpu_wait is None else {"cpu_wait_share": cpu_wait}),
            "memory_available_bytes": float(self._probe.memory_available_bytes()),
            "disk_free_bytes": float(disk_free_bytes(str(self.config.state_dir))),
        }
        temp = temperature_c()
        if temp is not None:
            system["temperature_c"] = temp
        requests = sum(w.requests for w in windows.values())
        p95 = max((float(w.latency_ms.get("p95", 0.0)) for w in windows.values()), default=0.0)
        tw = TelemetryWindow(
            fleet=self.config.fleet,
            device=self.config.device,
            seq=self._telemetry_seq,
            window_start=self._window_start,
            window_end=now,
            models=windows,
            system=system,
            metrics={
                "requests": requests,
                "errors": sum(w.errors for w in windows.values()),
                "latency_p95_ms": p95,
                "rss_mb": round(system["rss_bytes"] / 2**20, 2),
                "cpu_percent": system["process_cpu_percent"],
                "spool_dropped_total": self.spool.dropped_total,
                "spool_pending": len(self.spool),
            },
            agent_version=__version__,
            extra={
                "active_versions": {n: m.version for n, m in self.models.models().items()},
                "spool": {"dropped_total": self.spool.dropped_total, "pending": len(self.spool),
                          "bytes": self.spool.size_bytes, "max_bytes": self.spool.max_bytes},
            },
        )
        self._window_start = now
        self._spool_window(tw.seq, tw.to_json())
        # Persisted after the window is on disk: a kill in between is healed by _restore taking the
        # spool's highest seq, so a seq is never skipped (a gap means a window lost) nor reused.
        try:
            self._persist()
        except StoreFailed as exc:  # a full disk: say so once, keep serving, try again next window
            if not self._store_failing:
                self._store_failing = True
                log.error("cannot write the state folder (%s); serving on, retrying at every window", exc)
                self._event("store_failed", exc, message=str(exc))
            return
        if self._store_failing:
            self._store_failing = False
            log.info("the state folder is writable again")

    # -- telemetry store-and-forward (agent.spool) -----------------------------------------------

    def _spool_window(self, seq: int, payload: bytes) -> None:
        try:
            dropped = self.spool.put(seq, payload, keep=self.outbox.in_flight())
        except StoreFailed as exc:  # a full or broken disk: send it unspooled rather than lose it
            log.error("cannot spool telemetry window %d (%s); sending it without a copy", seq, exc)
            self._publish("telemetry", payload)
            return
        if dropped:
            self.outbox.forget(dropped)
            log.warning("telemetry spool full (%d bytes): dropped windows %s (%d dropped in all)",
                        self.spool.max_bytes, dropped, self.spool.dropped_total)
        self._pump_spool()

    def _pump_spool(self) -> None:
        """Publish spooled windows, oldest first, while the broker is there."""
        if self.link is None or not self.link.connected.is_set() or not len(self.spool):
            return
        now = time.monotonic()
        topic = self.topics.device(self.config.device, "telemetry")
        for seq in self.outbox.due(self.spool.seqs(), now):
            try:
                payload = self.spool.read(seq)
            except OSError as exc:
                log.error("spooled window %d is unreadable (%s); dropping it", seq, exc)
                self.spool.remove(seq)
                continue
            info = self.link.publish(topic, payload, qos=1)
            self.outbox.sent(seq, info.mid, now)

    def _spool_acked(self, mid: int) -> None:
        """The broker's PUBACK. Once the hub acknowledges windows itself, a PUBACK says only that
        the broker has the window (it may yet die with it): the window stays spooled, in flight,
        until the hub names it or ``resend_seconds`` pass."""
        if self._hub_acks:
            return
        seq = self.outbox.acked(mid)
        if seq is not None:
            self.spool.remove(seq)

    def _hub_acked(self, payload: bytes) -> None:
        try:
            ack = TelemetryAck.from_dict(parse_json_object(payload, "telemetry ack"))
        except EdgefleetError as exc:
            log.warning("ignored a telemetry ack: %s", exc)
            return
        if ack.device != self.config.device or ack.fleet != self.config.fleet:
            log.warning("ignored a telemetry ack for %s/%s", ack.fleet, ack.device)
            return
        self.outbox.forget(ack.seqs)
        for seq in ack.seqs:
            self.spool.remove(seq)
        if not self._hub_acks:
            self._hub_acks = True
            log.info("the hub acknowledges stored telemetry: windows now stay spooled until it has them")
            self._persist()
