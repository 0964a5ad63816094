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

Canary (:mod:`agent.core.canary`): an entry with ``canary`` names the *candidate*; ``canary.stable``
is installed and committed as the model's stable like any entry, and the candidate is fetched,
verified, guarded and preflighted *before* that commit, then attached beside the stable (shadow
or split). The commit persists the candidate in the state file's ``canaries`` map (``running``,
``dropped`` or ``preflight_failed`` with the reason), so a restart re-attaches a running candidate
without a second preflight, and a candidate dropped for a rollout is never attached again for
the same rollout and sha256 (a redelivery or a new seq carrying the same canary). An entry
without ``canary`` ends it: the candidate's version becomes the stable through the ordinary path
(promotion, reusing the verified blob), or the candidate is detached (rollback).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.adapters.fetch import Fetcher
from edgefleet.agent.adapters.modelcheck import check_model_bytes
from edgefleet.agent.adapters.store import Store
from edgefleet.agent.adapters.sysstat import rss_bytes
from edgefleet.agent.app.serving import LoadedModel, ModelServer, load
from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.errors import EdgefleetError, ModelRejected, Refused, StoreFailed, Unavailable
from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.agent.core.trust import NoKeyring, TrustedState, VerifiedDesired

if TYPE_CHECKING:  # imported where used: agent.canary costs ~1 MiB RSS and most agents never run a canary
    from edgefleet.agent.app.shadow import CanaryRun, CandidateModel
    from edgefleet.agent.core.canary import CanarySpec, CanaryStats, PreflightResult, Verdict

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
        # Canary: persisted records per model, the attached runs, drops reported by their threads.
        self.canaries: dict[str, dict[str, Any]] = {}
        self._runs: dict[str, CanaryRun] = {}
        self._retired: dict[str, CanaryStats] = {}
        self._drops: queue.SimpleQueue[tuple[CanaryRun, Verdict]] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None  # the daemon's main loop sets this
        self.memory_probe: Callable[[], int] = rss_bytes

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
                "canaries": self.canaries,
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
            "canaries",
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
        self.canaries = dict(state.get("canaries") or {})
        for name, rec in self.models.items():
            notes += self._serve_stable(name, rec)
        notes += self._resume_canaries()
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
        specs: dict[str, CanarySpec] = {}
        for n, e in desired.models.items():
            if e.canary is not None:
                from edgefleet.agent.core.canary import CanarySpec

                try:
                    spec = CanarySpec.from_mapping(e.canary, f"models[{n}].canary")
                    st = spec.stable
                    self.trust.check_blob(n, st.version, st.sha256, st.size, st.url)
                except Refused as exc:
                    return self._refuse(n, e, verified, exc)
                specs[n] = spec
        # The model each name serves as its stable: a canary entry's stable is ``canary.stable``.
        view = {n: specs[n].stable if n in specs else e for n, e in desired.models.items()}
        changed = {
            n: e
            for n, e in view.items()
            if (self.models.get(n) or {}).get("entry", {}).get("sha256") != e.sha256
        }
        removed = [n for n in self.models if n not in desired.models]
        starting = {n: s for n, s in specs.items() if not self._same_canary(n, desired.models[n], s)}
        ending = [n for n in self.canaries if n not in specs or n in starting]
        retuned = [n for n, sp in specs.items() if n not in starting and self._retuned(n, sp)]
        if not changed and not removed and not starting and not ending and not retuned:
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
        canaries = {n: r for n, r in self.canaries.items() if n not in ending}
        runs: dict[str, CanaryRun] = {}
        canary_notes: list[Note] = []
        for name in retuned:  # same rollout and candidate, new mode/fraction/limits: no new preflight
            spec = specs[name]
            canaries[name] = {**canaries[name], "mode": spec.mode, "fraction": spec.fraction,
                              "entry": desired.models[name].to_dict(), "seq": seq}
            old = self._runs.get(name)
            if old is not None:
                runs[name] = self._new_run(old.candidate, spec)
                canary_notes.append(Note("canary_started", "retuned",
                                         f"{name} {old.version}: {spec.mode} canary now at {spec.fraction:g}",
                                         model=name, version=old.version, seq=seq,
                                         extra={"rollout": spec.rollout, "mode": spec.mode,
                                                "fraction": spec.fraction}))
        for name, spec in starting.items():
            run, rec, notes = self._prepare_canary(name, desired.models[name], spec, seq)
            canaries[name] = rec
            canary_notes += notes
            if run is not None:
                runs[name] = run
        notes = self._switch_and_commit(verified, staged, removed, view=view, canaries=canaries)
        notes += self._end_canaries(ending, desired.models, seq)
        for name, run in runs.items():
            old = self._runs.pop(name, None)
            self._runs[name] = run
            self.server.attach_canary(name, run)
            if old is not None:
                old.stop()
            run.start()
        return notes + canary_notes

    def _stage(self, name: str, entry: ModelEntry) -> LoadedModel:
        rec = self.models.get(name) or {}
        running = self.canaries.get(name) or {}
        candidate = running.get("entry") if running.get("state") == "running" else None
        local = [e for e in (rec.get("fallback"), candidate) if e and e.get("sha256") == entry.sha256]
        if local and self.store.verify_blob(entry.sha256, entry.size):
            # Instant rollback or promotion of the canary: the blob was downloaded, verified and
            # guarded before.
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
        rss0 = self.memory_probe()
        model = load(name, entry, self.store.blob_path(entry.sha256), self.profile)
        if entry.preflight is not None and not local:
            # An ordinary entry may name a preflight set too: failing it refuses the update.
            result = self._preflight(name, entry, model.session, rss0)
            if result is not None and not result.ok:
                from edgefleet.agent.core.canary import PreflightFailed

                raise PreflightFailed(f"{name} {entry.version}: {result.message}", reason=result.reason)
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
        self,
        verified: VerifiedDesired,
        staged: dict[str, LoadedModel],
        removed: list[str],
        *,
        view: dict[str, ModelEntry] | None = None,
        canaries: dict[str, dict[str, Any]] | None = None,
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
        for name, entry in (desired.models if view is None else view).items():
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
        old_canaries = self.canaries
        if canaries is not None:
            self.canaries = canaries
        self.trust.mark_applied(verified)
        update, failed = self.update, self.failed
        self.update, self.failed, self.pending = None, None, None
        try:
            self.persist()
        except StoreFailed:
            self.models, self.update, self.failed = old_models, update, failed
            self.canaries = old_canaries
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

    # -- canary ----------------------------------------------------------------------------------

    def _same_canary(self, name: str, entry: ModelEntry, spec: CanarySpec) -> bool:
        """True if this rollout's candidate is already attached, or was dropped here before."""
        rec = self.canaries.get(name)
        return bool(rec and rec.get("rollout") == spec.rollout and rec["entry"]["sha256"] == entry.sha256)

    def _retuned(self, name: str, spec: CanarySpec) -> bool:
        rec = self.canaries.get(name) or {}
        limits = (rec.get("entry", {}).get("canary") or {}).get("limits") or {}
        return rec.get("state") == "running" and (rec.get("mode"), rec.get("fraction"), limits) != (
            spec.mode, spec.fraction, dict(spec.limits))

    def _new_run(self, model: CandidateModel, spec: CanarySpec) -> CanaryRun:
        from edgefleet.agent.app.shadow import CanaryRun
        from edgefleet.agent.core.canary import CanaryLimits

        return CanaryRun(
            candidate=model,
            spec=spec,
            limits=CanaryLimits.from_mapping(spec.limits, latency_slo_ms=self.profile.latency_slo_ms),
            on_drop=self._on_drop,
        )

    def _prepare_canary(
        self, name: str, entry: ModelEntry, spec: CanarySpec, seq: int
    ) -> tuple[CanaryRun | None, dict[str, Any], list[Note]]:
        """Fetch, verify, guard, load and preflight the candidate. Raises only Unavailable (the
        whole update retries); a refused candidate or a failed preflight becomes a record that
        keeps it from being attached again, and a note."""
        rec: dict[str, Any] = {
            "rollout": spec.rollout, "mode": spec.mode, "fraction": spec.fraction,
            "entry": entry.to_dict(), "seq": seq, "state": "running", "reason": None,
        }  # fmt: skip
        extra: dict[str, Any] = {"rollout": spec.rollout, "mode": spec.mode}
        try:
            path = self._fetch_candidate(entry)
            rss0 = self.memory_probe()
            model = load(name, entry, path, self.profile)
            result = self._preflight(name, entry, model.session, rss0)
        except Refused as exc:
            rec.update(state="dropped", reason=exc.reason)
            return None, rec, [Note.of("canary_dropped", exc, model=name, version=entry.version, seq=seq,
                                       extra=extra)]
        if result is not None and not result.ok:
            rec.update(state="preflight_failed", reason=result.reason, details=dict(result.details))
            return None, rec, [Note("preflight_failed", result.reason, f"{name} {entry.version}: {result.message}",
                                    model=name, version=entry.version, seq=seq,
                                    extra={**extra, "details": dict(result.details)})]
        run = self._new_run(model, spec)
        if result is not None:
            rec["details"] = dict(result.details)
        msg = f"{name} {entry.version} runs as a {spec.mode} canary ({spec.fraction:g}) beside the stable"
        return run, rec, [Note("canary_started", "", msg, model=name, version=entry.version, seq=seq,
                               extra={**extra, "fraction": spec.fraction,
                                      "preflight": dict(result.details) if result else None})]

    def _fetch_candidate(self, entry: ModelEntry) -> Path:
        """Download (or find), verify and guard a candidate blob; no state machine transition:
        the candidate never replaces the stable on this path."""
        if not self.store.verify_blob(entry.sha256, entry.size):
            self.store.blob_path(entry.sha256).unlink(missing_ok=True)
            part = self.store.partial_path(entry.sha256)
            self.fetcher.fetch(entry.url, part, size=entry.size)
            self.store.commit_blob(part, entry.sha256, entry.size)
        path = self.store.blob_path(entry.sha256)
        if self.guard is not None:
            self.guard(path)  # structural checks and the first session, in a child process
        else:
            check_model_bytes(path.read_bytes())
        return path

    def _preflight(self, name: str, entry: ModelEntry, session: Any, rss0: int) -> PreflightResult | None:
        ref = entry.preflight
        if ref is None:
            return None
        from edgefleet.agent.core.canary import (
            PreflightParams,
            PreflightRejected,
            PreflightResult,
            load_preflight,
            run_preflight,
        )

        try:
            params = PreflightParams.from_mapping(ref)
            sha, size, url = ref.get("sha256"), ref.get("size"), ref.get("url")
            if not isinstance(sha, str) or not isinstance(size, int) or not isinstance(url, str):
                raise PreflightRejected("preflight needs sha256 (string), size (integer) and url (string)")
            self.trust.check_blob(f"{name} preflight", entry.version, sha, size, url)
            if not self.store.verify_blob(sha, size):
                part = self.store.partial_path(sha)
                self.fetcher.fetch(url, part, size=size)
                self.store.commit_blob(part, sha, size)
            arrays = load_preflight(self.store.blob_path(sha).read_bytes())
        except Refused as exc:  # malformed reference, hash/size mismatch, not an .npz
            return PreflightResult(False, "preflight_blob", f"preflight set unusable: {exc}",
                                   {"cause": exc.reason})
        result = run_preflight(session, arrays, params, self.profile, clock=time.perf_counter)
        grown = max(0, self.memory_probe() - rss0) / 2**20
        if result.ok and grown > self.profile.memory_budget_mb:
            return PreflightResult(False, "preflight_memory",
                                   f"loading and running the candidate grew the agent by {grown:.1f} MiB, "
                                   f"the profile allows {self.profile.memory_budget_mb} MiB",
                                   {**result.details, "memory_mb": round(grown, 2),
                                    "memory_budget_mb": self.profile.memory_budget_mb})
        return result

    def _end_canaries(self, names: list[str], models: Any, seq: int) -> list[Note]:
        notes: list[Note] = []
        for name in names:
            run = self._runs.pop(name, None)
            self._retired.pop(name, None)
            if run is None:
                continue
            self.server.detach_canary(name, run)
            run.stop()
            entry = models.get(name)
            if entry is None:
                why = "removed"
            elif entry.sha256 == run.sha256 and entry.canary is None:
                why = "promoted"
            elif entry.canary is not None:
                why = "replaced"
            else:
                why = "rollback"
            notes.append(Note("canary_ended", why, f"{name} {run.version}: canary ended ({why})", model=name,
                              version=run.version, seq=seq, extra={"rollout": run.spec.rollout}))
        return notes

    def _resume_canaries(self) -> list[Note]:
        """After a restart: re-attach the candidates that were running (preflight passed then)."""
        notes: list[Note] = []
        for name, rec in self.canaries.items():
            if rec.get("state") != "running":
                continue
            entry = ModelEntry.from_dict(rec["entry"])
            from edgefleet.agent.core.canary import CanarySpec

            try:
                spec = CanarySpec.from_mapping(entry.canary or {})
                if name not in self.server.models():
                    raise ModelRejected(f"{name} has no stable serving", reason="no_stable")
                if not self.store.verify_blob(entry.sha256, entry.size):
                    raise ModelRejected(f"{name} {entry.version}: candidate blob missing or corrupt",
                                        reason="candidate_missing")
                model = load(name, entry, self.store.blob_path(entry.sha256), self.profile)
            except Refused as exc:
                rec.update(state="dropped", reason=exc.reason)
                notes.append(Note.of("canary_dropped", exc, model=name, version=entry.version,
                                     extra={"rollout": rec.get("rollout")}))
                continue
            run = self._new_run(model, spec)
            self._runs[name] = run
            self.server.attach_canary(name, run)
            run.start()
            log.info("resumed canary %s %s (%s)", name, entry.version, spec.mode)
        return notes

    def _on_drop(self, run: CanaryRun, verdict: Verdict) -> None:
        """Called on the thread that saw the verdict: detach now, report from the main loop."""
        self.server.detach_canary(run.name, run)
        self._drops.put((run, verdict))
        self.wake()

    def poll_canary(self) -> list[Note]:
        """Main loop: persist and report candidates the local guard dropped since the last call."""
        notes: list[Note] = []
        while True:
            try:
                run, verdict = self._drops.get_nowait()
            except queue.Empty:
                break
            if self._runs.get(run.name) is not run:
                continue  # ended meanwhile
            del self._runs[run.name]
            self._retired[run.name] = run.stats  # its last numbers go out with the next window
            rec = self.canaries.get(run.name)
            if rec is not None:
                rec.update(state="dropped", reason=verdict.reason, numbers=dict(verdict.numbers))
            notes.append(Note("canary_dropped", verdict.reason, f"{run.name} {run.version}: {verdict.message}",
                              model=run.name, version=run.version,
                              extra={"rollout": run.spec.rollout, "mode": run.mode, **verdict.numbers}))
        if notes:
            self.persist()
            self._gc()
        return notes

    def canary_windows(self) -> dict[str, dict[str, Any]]:
        """Per stable model name, the ``canary`` field of its ModelWindow for the closing window."""
        out = {name: run.stats.window() for name, run in self._runs.items()}
        for name, stats in self._retired.items():
            out.setdefault(name, stats.window())
        self._retired.clear()
        for name, rec in self.canaries.items():
            if name not in out and rec.get("state") != "running":
                from edgefleet.agent.core.canary import CanaryStats

                stats = CanaryStats(rollout=str(rec.get("rollout")), mode=str(rec.get("mode")),
                                    version=str(rec["entry"]["version"]))
                stats.state, stats.reason = str(rec["state"]), rec.get("reason")
                out[name] = stats.window()
        return out

    def canary(self, name: str) -> CanaryRun | None:
        return self._runs.get(name)

    def stop_canaries(self) -> None:
        for run in self._runs.values():
            run.stop()

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
        for rec in self.canaries.values():
            if rec.get("state") == "running":
                keep.add(rec["entry"]["sha256"])
        self.store.gc(keep)
        if self.update is None:
            for p in self.store.partial.iterdir():
                with contextlib.suppress(OSError):
                    p.unlink()
