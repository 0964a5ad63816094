"""The update core: trusted state, store, fetcher and guard behind one per-model state machine.

:class:`Updater` is what the daemon calls with the bytes MQTT delivered; it returns
:class:`Note` objects (what happened, with a machine-readable reason) that the daemon publishes
as events. It owns the agent's state file and is its only writer. No MQTT and no wall clock live
here: the reference time is passed in, the fetcher and the guard are seams.

Per model, each transition is persisted (atomic write) before the work it announces::

    idle/active --> downloading --> verifying --> staged --> active
                        |               |           |
                        +---------------+-----------+--> failed       (stable keeps serving)
    active --> rolled-back   (local, instant: the fallback blob is on disk and was verified)

The steps of one update, with the names a test hook can pause at (``EDGEFLEET_TEST_PAUSE_AT``):

    download  bytes go to ``blobs/.partial/<sha256>`` (resumable, never loaded)
    verify    size + sha256 checked, then renamed into ``blobs/<sha256>``; structural checks
    guard     first ONNX Runtime session in a child process (memory limit, timeout)
    stage     the session the agent will serve is opened in-process; state ``staged``
    switch    the staged sessions replace the stable ones in the model server (in memory)
    commit    one atomic write: stable := candidate, fallback := old stable, seq applied

A kill before ``commit`` leaves the old stable entries in the state file, and their blobs are
kept until a commit no longer references them, so a restart serves the old, verified model and
resumes the update. A kill after ``commit`` serves the new one. Every start that finds an update
in progress counts one restart (unless it was waiting to retry a download the network refused);
after ``max_restarts`` the update is abandoned as
``crash_loop``: reported, remembered by digest (a redelivery is not retried) and the previous
models keep serving. Redeploying what is installed is a no-op (``already_installed``).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import DeviceProfile
from agent.errors import EdgefleetError, Refused, StoreFailed, Unavailable
from agent.fetch import Fetcher
from agent.guard import check_model_bytes
from agent.serving import LoadedModel, ModelServer, load
from agent.store import Store
from agent.trust import NoKeyring, TrustedState, VerifiedDesired
from agent.wire import ModelEntry

__all__ = ["STEPS", "Note", "Phase", "Updater", "pause_hook_from_env"]

log = logging.getLogger("edgefleet.agent.update")

STEPS = ("download", "verify", "guard", "stage", "switch", "commit")
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "EDGEFLEET_TEST_PAUSE_MARKER"


class Phase(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


@dataclass(frozen=True)
class Note:
    """Something the operator should hear about; the daemon turns it into an ``Event``."""

    type: str  # update | refused | update_failed | noop | rollback | removed | restored
    reason: str = ""
    message: str = ""
    model: str | None = None
    version: str | None = None
    seq: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, type_: str, exc: EdgefleetError, **kw: Any) -> Note:
        return cls(type=type_, reason=exc.reason, message=str(exc), **kw)


Guard = Callable[[Path], None]
StepHook = Callable[[str], None]


def pause_hook_from_env(state_dir: Path) -> StepHook | None:
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


class Updater:
    def __init__(
        self,
        *,
        store: Store,
        trust: TrustedState,
        fetcher: Fetcher,
        profile: DeviceProfile,
        server: ModelServer,
        guard: Guard | None = None,
        on_step: StepHook | None = None,
        max_restarts: int = 3,
    ) -> None:
        self.store = store
        self.trust = trust
        self.fetcher = fetcher
        self.profile = profile
        self.server = server
        self.guard = guard
        self.on_step = on_step or (lambda _step: None)
        self.max_restarts = max_restarts
        self.provisioned_root = trust.root
        self.extra: dict[str, Any] = {}  # fields other owners keep in the state file
        self.models: dict[str, dict[str, Any]] = {}
        self.update: dict[str, Any] | None = None
        self.failed: dict[str, Any] | None = None
        self.pending: bytes | None = None  # desired state waiting for a keyring or a retry
        self.last_keyring: bytes | None = None  # retried after a root rotation

    # -- persistence -----------------------------------------------------------------------------

    def persist(self) -> None:
        t = self.trust
        self.store.write_state(
            {
                **self.extra,
                "keyring": t.keyring_raw.decode() if t.keyring_raw else None,
                "roots": [r.decode() for r in t.root_chain],
                "last_seq": t.last_seq,
                "last_digest": t.last_digest,
                "models": self.models,
                "update": self.update,
                "failed": self.failed,
            }
        )

    def restore(self) -> list[Note]:
        """Read the state file, re-verify trust, serve the stable models; resume or abandon an
        update that was in progress when the agent died."""
        notes: list[Note] = []
        state = self.store.read_state()
        known = {
            "kind",
            "keyring",
            "roots",
            "last_seq",
            "last_digest",
            "models",
            "update",
            "failed",
        }
        self.extra = {k: v for k, v in state.items() if k not in known}
        for link in state.get("roots") or []:
            try:
                self.trust.update_root(link.encode())
            except EdgefleetError as exc:
                log.error("stored root rotation no longer verifies (%s)", exc)
                break
        if state.get("keyring"):
            try:
                self.trust.update_keyring(state["keyring"].encode())
            except EdgefleetError as exc:
                log.error("stored keyring no longer verifies (%s); waiting for the hub's", exc)
        self.trust.last_seq = int(state.get("last_seq", 0))
        self.trust.last_digest = state.get("last_digest")
        self.models = dict(state.get("models") or {})
        self.update = state.get("update")
        self.failed = state.get("failed")
        for name, rec in self.models.items():
            notes += self._serve_stable(name, rec)
        if self.update is not None:
            # A restart while the update waited for the network is no sign of a crash loop.
            if not self.update.pop("waiting", False):
                self.update["restarts"] = int(self.update.get("restarts", 0)) + 1
            if self.update["restarts"] > self.max_restarts:
                notes += self._abandon_crash_loop()
            else:
                self.pending = base64.b64decode(self.update["raw"])
                log.warning(
                    "resuming the update to seq %s (restart %d of %d)",
                    self.update["seq"],
                    self.update["restarts"],
                    self.max_restarts,
                )
        self.persist()
        self._gc()
        return notes

    def _serve_stable(self, name: str, rec: dict[str, Any]) -> list[Note]:
        if rec.get("state") not in (Phase.ACTIVE, Phase.ROLLED_BACK, Phase.FAILED):
            # An update was in flight for this model: it resumes from scratch (the partial
            # download is kept and continued with Range).
            rec["state"] = Phase.ACTIVE.value if rec.get("entry") else Phase.IDLE.value
        if not rec.get("entry") and not rec.get("fallback"):
            return []
        for which in ("entry", "fallback"):
            raw = rec.get(which)
            if not raw:
                continue
            entry = ModelEntry.from_dict(raw)
            if not self.store.verify_blob(entry.sha256, entry.size):
                log.error("installed blob for %s %s is missing or corrupt", name, entry.version)
                continue
            try:
                self.server.install(
                    load(name, entry, self.store.blob_path(entry.sha256), self.profile)
                )
            except EdgefleetError as exc:
                log.error("cannot load installed %s %s: %s", name, entry.version, exc)
                continue
            if which == "fallback":
                rec["entry"], rec["fallback"], rec["state"] = raw, None, Phase.ROLLED_BACK.value
                return [
                    Note(
                        "rollback",
                        "stable_unusable",
                        f"{name}: stable blob unusable, serving fallback {entry.version}",
                        model=name,
                        version=entry.version,
                    )
                ]
            return []
        return [
            Note(
                "update_failed",
                "no_verified_model",
                f"{name}: neither the stable nor the fallback blob verifies",
                model=name,
            )
        ]

    def _abandon_crash_loop(self) -> list[Note]:
        assert self.update is not None
        up, self.update = self.update, None
        self.failed = {"digest": up["digest"], "seq": up["seq"], "reason": "crash_loop"}
        for rec in self.models.values():
            if rec.get("candidate") is not None:
                rec["state"], rec["reason"], rec["candidate"] = (
                    Phase.FAILED.value,
                    "crash_loop",
                    None,
                )
        msg = (
            f"the update to seq {up['seq']} was interrupted by {up['restarts'] - 1} restarts; "
            "it is abandoned and the previous models keep serving. Publish a new desired "
            "state (higher seq) after fixing the cause"
        )
        log.error(msg)
        return [Note("update_failed", "crash_loop", msg, seq=up["seq"])]

    # -- trust inputs ----------------------------------------------------------------------------

    def handle_roots(self, raw: bytes, *, now: float) -> list[Note]:
        trusted_before = self.trust.keyring_raw
        try:
            adopted = self.trust.update_roots(raw)
        except Refused as exc:
            return [Note.of("refused", exc, extra={"detail": "root"})]
        if not adopted:
            return []
        self.persist()
        notes = [
            Note(
                "root_rotated",
                "",
                f"trusting root version {r.version}",
                extra={"root_version": r.version},
            )
            for r in adopted
        ]
        if self.trust.keyring is None and self.last_keyring not in (None, trusted_before):
            assert self.last_keyring is not None
            notes += self.handle_keyring(self.last_keyring, now=now)
        return notes

    def handle_keyring(self, raw: bytes, *, now: float) -> list[Note]:
        self.last_keyring = raw
        try:
            ring = self.trust.update_keyring(raw)
        except Refused as exc:
            return [Note.of("refused", exc, extra={"detail": "keyring"})]
        if ring is None:
            return []
        log.info("trusting keyring v%d (%d keys)", ring.version, len(ring.keys))
        self.persist()
        return self.retry(now=now) if self.pending is not None else []

    # -- desired states --------------------------------------------------------------------------

    def offer(self, raw: bytes, *, now: float) -> list[Note]:
        """A desired state arrived (``now`` is this cycle's reference time)."""
        self.pending = raw
        return self.retry(now=now)

    def retry(self, *, now: float) -> list[Note]:
        raw = self.pending
        if raw is None:
            return []
        try:
            verified = self.trust.check_desired(raw, now=now)
        except NoKeyring:
            return []
        except Refused as exc:
            self.pending = None
            if self.update is not None and self.update["raw"] == base64.b64encode(raw).decode():
                self.update = None
                self.persist()
            return [Note.of("refused", exc)]
        if verified is None:
            self.pending = None
            return []
        if self.failed is not None and self.failed.get("digest") == verified.digest:
            self.pending = None
            return []  # already reported; only a new state (higher seq) is tried again
        try:
            return self._apply(verified)
        except Unavailable as exc:
            if self.update is not None:
                self.update["waiting"] = True
                with contextlib.suppress(StoreFailed):
                    self.persist()
            return [Note.of("update_failed", exc, seq=verified.state.seq, extra={"retrying": True})]

    def _apply(self, verified: VerifiedDesired) -> list[Note]:
        desired = verified.state
        seq = desired.seq
        if self.update is None or self.update.get("digest") != verified.digest:
            self.update = {
                "seq": seq,
                "digest": verified.digest,
                "restarts": 0,
                "raw": base64.b64encode(verified.raw).decode(),
            }
        self.update["waiting"] = False
        changed = {
            n: e
            for n, e in desired.models.items()
            if (self.models.get(n) or {}).get("entry", {}).get("sha256") != e.sha256
        }
        removed = [n for n in self.models if n not in desired.models]
        if not changed and not removed:
            self.trust.mark_applied(verified)
            self.update, self.pending = None, None
            self.persist()
            return [
                Note(
                    "noop",
                    "already_installed",
                    f"seq {seq}: every model is already installed at the desired version",
                    seq=seq,
                )
            ]
        staged: dict[str, LoadedModel] = {}
        for name, entry in changed.items():
            try:
                staged[name] = self._stage(name, entry)
            except Refused as exc:
                return self._refuse(name, entry, verified, exc)
            except Unavailable as exc:
                self._transition(name, Phase.FAILED, entry, reason=exc.reason)
                raise
        return self._switch_and_commit(verified, staged, removed)

    def _stage(self, name: str, entry: ModelEntry) -> LoadedModel:
        rec = self.models.get(name) or {}
        local = [e for e in (rec.get("fallback"),) if e and e.get("sha256") == entry.sha256]
        if local and self.store.verify_blob(entry.sha256, entry.size):
            # Instant rollback: the fallback was downloaded, verified and guarded before.
            self._transition(name, Phase.VERIFYING, entry)
        else:
            self._transition(name, Phase.DOWNLOADING, entry)
            self.on_step("download")
            if not self.store.has_blob(entry.sha256, entry.size):
                part = self.store.partial_path(entry.sha256)
                self.fetcher.fetch(entry.url, part, size=entry.size)
                self._transition(name, Phase.VERIFYING, entry)
                self.on_step("verify")
                self.store.commit_blob(part, entry.sha256, entry.size)
            else:
                self._transition(name, Phase.VERIFYING, entry)
                self.on_step("verify")
                if not self.store.verify_blob(entry.sha256, entry.size):
                    self.store.blob_path(entry.sha256).unlink(missing_ok=True)
                    raise StoreFailed(
                        f"stored blob {entry.sha256[:16]}… was corrupt; removed, "
                        "it is downloaded again on retry"
                    )
            path = self.store.blob_path(entry.sha256)
            self.on_step("guard")
            if self.guard is not None:
                self.guard(path)  # structural checks and the first session, in a child process
            else:
                check_model_bytes(path.read_bytes())
        model = load(name, entry, self.store.blob_path(entry.sha256), self.profile)
        self._transition(name, Phase.STAGED, entry)
        self.on_step("stage")
        return model

    def _transition(self, name: str, phase: Phase, candidate: ModelEntry, reason: str = "") -> None:
        rec = self.models.setdefault(name, {"entry": None, "fallback": None})
        rec["state"], rec["reason"] = phase.value, reason
        rec["candidate"] = candidate.to_dict() if phase is not Phase.FAILED else None
        if rec.get("entry") is None and phase is Phase.FAILED:
            del self.models[name]
        self.persist()

    def _refuse(
        self, name: str, entry: ModelEntry, verified: VerifiedDesired, exc: Refused
    ) -> list[Note]:
        self._transition(name, Phase.FAILED, entry, reason=exc.reason)
        for other in self.models.values():  # models staged before this one are dropped too
            if other.get("candidate") is not None:
                other["state"], other["candidate"] = Phase.ACTIVE.value, None
        self.update, self.pending = None, None
        self.failed = {"digest": verified.digest, "seq": verified.state.seq, "reason": exc.reason}
        self.persist()
        self._gc()
        return [Note.of("refused", exc, model=name, version=entry.version, seq=verified.state.seq)]

    def _switch_and_commit(
        self, verified: VerifiedDesired, staged: dict[str, LoadedModel], removed: list[str]
    ) -> list[Note]:
        desired = verified.state
        self.on_step("switch")
        before = dict(self.server.models())
        for model in staged.values():
            self.server.install(model)
        for name in removed:
            self.server.remove(name)
        self.on_step("commit")
        old_models, old_seq = self.models, (self.trust.last_seq, self.trust.last_digest)
        models: dict[str, dict[str, Any]] = {}
        for name, entry in desired.models.items():
            prev = self.models.get(name) or {}
            if name in staged:
                models[name] = {
                    "entry": entry.to_dict(),
                    "fallback": prev.get("entry"),
                    "state": Phase.ACTIVE.value,
                    "candidate": None,
                    "reason": "",
                }
            else:
                models[name] = {**prev, "entry": entry.to_dict()}
        self.models = models
        self.trust.mark_applied(verified)
        update, failed = self.update, self.failed
        self.update, self.failed, self.pending = None, None, None
        try:
            self.persist()
        except StoreFailed:
            self.models, self.update, self.failed = old_models, update, failed
            self.trust.last_seq, self.trust.last_digest = old_seq
            for name in list(self.server.models()):
                if name not in before:
                    self.server.remove(name)
            for model in before.values():
                self.server.install(model)
            raise
        self._gc()
        notes = [
            Note(
                "update", "", f"{n} {m.version} active", model=n, version=m.version, seq=desired.seq
            )
            for n, m in staged.items()
        ]
        notes += [Note("removed", "", f"{n} removed", model=n, seq=desired.seq) for n in removed]
        return notes

    # -- local rollback --------------------------------------------------------------------------

    def rollback(self, name: str, reason: str) -> list[Note]:
        """Serve the fallback of ``name`` now (no download, no hub); persisted as rolled-back."""
        rec = self.models.get(name)
        if not rec or not rec.get("fallback"):
            return [
                Note(
                    "rollback_failed", "no_fallback", f"{name} has no fallback on disk", model=name
                )
            ]
        entry = ModelEntry.from_dict(rec["fallback"])
        if not self.store.verify_blob(entry.sha256, entry.size):
            return [
                Note(
                    "rollback_failed",
                    "fallback_corrupt",
                    f"{name}: fallback {entry.version} blob is missing or corrupt",
                    model=name,
                )
            ]
        model = load(name, entry, self.store.blob_path(entry.sha256), self.profile)
        self.server.install(model)
        rec["entry"], rec["fallback"] = rec["fallback"], rec["entry"]
        rec["state"], rec["reason"] = Phase.ROLLED_BACK.value, reason
        self.persist()
        return [
            Note(
                "rollback",
                reason,
                f"{name} rolled back to {entry.version}",
                model=name,
                version=entry.version,
            )
        ]

    # -- queries and housekeeping ----------------------------------------------------------------

    def model_state(self, name: str) -> str:
        return str((self.models.get(name) or {}).get("state") or Phase.ACTIVE.value)

    def _gc(self) -> None:
        keep: set[str] = set()
        for rec in self.models.values():
            for which in ("entry", "fallback", "candidate"):
                if rec.get(which):
                    keep.add(rec[which]["sha256"])
        self.store.gc(keep)
        if self.update is None:
            for p in self.store.partial.iterdir():
                with contextlib.suppress(OSError):
                    p.unlink()
