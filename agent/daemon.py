"""The agent daemon: wires the pure core to MQTT, HTTP, disk and ONNX Runtime.

Threads, each named: ``agent-main`` (the only writer of the store: applies keyrings and desired
states, closes telemetry windows), paho's network thread (puts messages on the inbox, never
blocks), and ``oip-http`` (serves inference). Lifecycle: NEW -> STARTING -> SERVING -> STOPPING
-> STOPPED. On start the installed models are verified and served *before* the broker is
reached, so a device that reboots without network keeps answering.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent import __version__
from agent.capture import make_capture
from agent.config import AgentConfig
from agent.envelope import public_key_from_b64
from agent.errors import EdgefleetError, Refused, StoreFailed, Unavailable
from agent.fetch import Fetcher, HttpFetcher
from agent.mqttlink import MqttLink
from agent.serving import LoadedModel, ModelServer, load, providers_for
from agent.store import Store
from agent.telemetry import fold
from agent.trust import NoKeyring, TrustedState, VerifiedDesired
from agent.wire import (
    Event,
    ModelEntry,
    ModelReport,
    ModelWindow,
    Reported,
    Status,
    TelemetryWindow,
    Topics,
)
from agent.oip import OipServer

__all__ = ["Agent", "AgentState"]

log = logging.getLogger("edgefleet.agent")

Clock = Callable[[], float]
RETRY_SECONDS = 5.0


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
        self.fetcher: Fetcher = fetcher or HttpFetcher()
        self._notify = notify or (lambda _msg: None)
        self.trust = TrustedState(
            root=public_key_from_b64(config.root_public_key),
            fleet=config.fleet,
            device=config.device,
            max_blob_bytes=config.profile.max_blob_bytes,
        )
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._pending: bytes | None = None  # desired state waiting for a keyring or a retry
        self._failed_digest: str | None = None
        self._retry_at: float | None = None
        self._telemetry_seq = 0
        self._window_start = clock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)
        self._thread: threading.Thread | None = None
        self.http: OipServer | None = None
        self.link: MqttLink | None = None
        self.capture = make_capture(config, clock)
        self.models.capture = self.capture

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
        self._notify(f"READY=1\nSTATUS={self.status_line()}")
        self.link = MqttLink(
            url=self.config.broker_url,
            client_id=f"edgefleet-agent-{self.config.fleet}-{self.config.device}",
            subscriptions=[(self.topics.keyring, 1), (self.topics.desired(self.config.device), 1)],
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=(self.topics.device(self.config.device, "status"), self._status("offline"), 1, True),
        )
        self.link.start()
        self._thread = threading.Thread(target=self._main, name="agent-main", daemon=True)
        self._thread.start()
        log.info(
            "agent %s/%s serving %s on http://%s:%d",
            self.config.fleet, self.config.device, self.status_line(), *self.http.address,
        )

    def stop(self) -> None:
        self.state = AgentState.STOPPING
        self._notify("STOPPING=1")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
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
        if not served:
            return "no model installed"
        return ", ".join(f"{n} {m.version}" for n, m in sorted(served.items()))

    # -- restore ---------------------------------------------------------------------------------

    def _restore(self) -> None:
        state = self.store.read_state()
        if state.get("keyring"):
            try:
                self.trust.update_keyring(state["keyring"].encode())
            except EdgefleetError as exc:
                log.error("stored keyring no longer verifies (%s); waiting for the hub's", exc)
        self.trust.last_seq = int(state.get("last_seq", 0))
        self.trust.last_digest = state.get("last_digest")
        self._telemetry_seq = int(state.get("telemetry_seq", 0))
        for name, rec in state.get("models", {}).items():
            entry = ModelEntry.from_dict(rec["entry"])
            if not self.store.verify_blob(entry.sha256, entry.size):
                log.error("installed blob for %s %s is missing or corrupt", name, entry.version)
                continue
            try:
                self.models.install(load(name, entry, self.store.blob_path(entry.sha256), self.config.profile))
                self._entries[name] = rec
            except EdgefleetError as exc:
                log.error("cannot load installed %s %s: %s", name, entry.version, exc)

    def _persist(self) -> None:
        self.store.write_state({
            "keyring": self.trust.keyring_raw.decode() if self.trust.keyring_raw else None,
            "last_seq": self.trust.last_seq,
            "last_digest": self.trust.last_digest,
            "telemetry_seq": self._telemetry_seq,
            "models": self._entries,
        })

    # -- MQTT (network thread: enqueue only) -----------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic == self.topics.keyring:
            self._inbox.put(("keyring", payload))
        elif topic == self.topics.desired(self.config.device) and payload:
            self._inbox.put(("desired", payload))

    def _on_connect(self) -> None:
        self._inbox.put(("connected", b""))

    # -- main loop -------------------------------------------------------------------------------

    def _main(self) -> None:
        window = self.config.profile.window_seconds
        next_window = time.monotonic() + window
        while not self._stop.is_set():
            timeout = max(0.0, next_window - time.monotonic())
            if self._retry_at is not None:
                timeout = min(timeout, max(0.0, self._retry_at - time.monotonic()))
            try:
                kind, payload = self._inbox.get(timeout=min(timeout, 1.0))
            except queue.Empty:
                kind, payload = "", b""
            try:
                if kind == "keyring":
                    self._handle_keyring(payload)
                elif kind == "desired":
                    self._pending = payload
                    self._failed_digest = None
                    self._try_desired()
                elif kind == "connected":
                    self._publish_presence()
                if self._retry_at is not None and time.monotonic() >= self._retry_at:
                    self._retry_at = None
                    self._try_desired()
                if time.monotonic() >= next_window:
                    next_window += window
                    self._close_window()
                self._notify("WATCHDOG=1")
            except Exception:  # the loop must outlive any single failure
                log.exception("unexpected error in the agent main loop")

    def _handle_keyring(self, raw: bytes) -> None:
        try:
            ring = self.trust.update_keyring(raw)
        except Refused as exc:
            self._event("refused", exc, detail="keyring")
            return
        if ring is not None:
            log.info("trusting keyring v%d (%d keys)", ring.version, len(ring.keys))
            self._persist()
            if self._pending is not None:
                self._try_desired()

    def _try_desired(self) -> None:
        raw = self._pending
        if raw is None:
            return
        try:
            verified = self.trust.check_desired(raw, now=self.clock())
        except NoKeyring:
            return  # waits for the keyring
        except Refused as exc:
            self._pending = None
            self._event("refused", exc)
            return
        if verified is None:
            self._pending = None
            return
        try:
            self._apply(verified)
        except Unavailable as exc:
            self._retry_at = time.monotonic() + RETRY_SECONDS
            self._event("update_failed", exc, seq=verified.state.seq, retrying=True)
            return
        except Refused as exc:
            self._pending = None
            self._event("refused", exc, seq=verified.state.seq)
            return
        self._pending = None

    def _apply(self, verified: VerifiedDesired) -> None:
        """Fetch, check and load every changed model, then switch all at once and commit."""
        desired = verified.state
        staged: dict[str, LoadedModel] = {}
        for name, entry in desired.models.items():
            current = self.models.models().get(name)
            if current is not None and current.entry.sha256 == entry.sha256:
                continue
            if not self.store.has_blob(entry.sha256, entry.size):
                part = self.store.partial_path(entry.sha256)
                self.fetcher.fetch(entry.url, part, size=entry.size)
                self.store.commit_blob(part, entry.sha256, entry.size)
            staged[name] = load(name, entry, self.store.blob_path(entry.sha256), self.config.profile)
            _, missing = providers_for(self.config.profile)
            if missing:
                self._event("provider_fallback", None, model=name, message=f"execution providers not available here: {missing}")
        entries: dict[str, dict[str, Any]] = {}
        for name, entry in desired.models.items():
            prev = self._entries.get(name)
            if name in staged:
                fallback = prev["entry"] if prev else None
                entries[name] = {"entry": entry.to_dict(), "fallback": fallback}
            else:
                entries[name] = {**(prev or {}), "entry": entry.to_dict()}
        old_entries = self._entries
        self.trust.mark_applied(verified)
        self._entries = entries
        try:
            self._persist()
        except StoreFailed:
            self._entries = old_entries
            raise
        for name, model in staged.items():
            self.models.install(model)
            self._event("update", None, model=name, version=model.version, seq=desired.seq,
                        message=f"{name} {model.version} active")
        for name in list(self.models.models()):
            if name not in desired.models:
                self.models.remove(name)
                self._event("removed", None, model=name, seq=desired.seq, message=f"{name} removed")
        keep = {r["entry"]["sha256"] for r in entries.values()}
        keep |= {r["fallback"]["sha256"] for r in entries.values() if r.get("fallback")}
        self.store.gc(keep)
        self._publish_reported()
        self._notify(f"STATUS={self.status_line()}")

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
                n: ModelReport(version=m.version, sha256=m.entry.sha256, state="active")
                for n, m in self.models.models().items()
            },
            agent_version=__version__,
        )
        self._publish("reported", rep.to_json(), retain=True)

    def _event(self, type_: str, exc: EdgefleetError | None, *, model: str | None = None,
               version: str | None = None, seq: int | None = None, message: str = "",
               **extra: Any) -> None:
        ev = Event(
            fleet=self.config.fleet,
            device=self.config.device,
            time=self.clock(),
            type=type_,
            reason=exc.reason if exc else "",
            message=str(exc) if exc else message,
            model=model,
            version=version,
            seq=seq,
            extra=extra,
        )
        (log.warning if exc else log.info)("%s %s %s", type_, ev.reason, ev.message)
        self._publish("events", ev.to_json())

    def _close_window(self) -> None:
        now = self.clock()
        windows: dict[str, ModelWindow] = {}
        for name, model in self.models.models().items():
            windows[name] = fold(model.recorder.swap(), model.entry.reference)
        self._telemetry_seq += 1
        self._persist()
        mem = psutil.virtual_memory()
        try:
            disk_free = psutil.disk_usage(str(self.config.state_dir)).free
        except OSError:
            disk_free = 0
        system = {
            "process_cpu_percent": self._proc.cpu_percent(None),
            "rss_bytes": float(self._proc.memory_info().rss),
            "system_cpu_percent": psutil.cpu_percent(None),
            "memory_available_bytes": float(mem.available),
            "disk_free_bytes": float(disk_free),
        }
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
            },
            agent_version=__version__,
        )
        self._window_start = now
        self._publish("telemetry", tw.to_json())
