"""The updater: executes the pure update state machine (:mod:`agent.core.update`) on the device.

:class:`Updater` is what the daemon calls with the bytes MQTT delivered; it returns
:class:`~agent.core.update.Note` objects (what happened, with a machine-readable reason) that the
daemon publishes as events. It owns the agent's state file and is its only writer. The decisions
(what changes, which transition comes next, what a commit or a refusal leaves in the state) are
:class:`~agent.core.update.UpdateCore`'s; this module does the work they announce: downloads,
the guard process, ONNX Runtime sessions, the model server, the disk. No MQTT and no wall clock
live here: the reference time is passed in, the fetcher and the guard are seams.

Every transition is persisted (atomic write) before the work it announces. The steps of one
update, with the names the ``on_step`` hook is called with (a crash test pauses the agent there):

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

import contextlib
import logging
import queue
import time
from collections.abc import Callable
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
from edgefleet.agent.core.trust import TRUST_FIELDS, NoKeyring, TrustedState, VerifiedDesired
from edgefleet.agent.core.update import STATE_FIELDS, Note, Plan, Step, UpdateCore, canary_end_reason

if TYPE_CHECKING:  # imported where used: agent.canary costs ~1 MiB RSS and most agents never run a canary
    from edgefleet.agent.app.shadow import CanaryRun, CandidateModel
    from edgefleet.agent.core.canary import CanarySpec, CanaryStats, PreflightResult, Verdict

__all__ = ["STEPS", "Guard", "StepHook", "Updater"]

log = logging.getLogger("edgefleet.agent.update")

STEPS = ("download", "verify", "guard", "stage", "switch", "commit")
Guard = Callable[[Path], None]
StepHook = Callable[[str], None]


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
        self.core = UpdateCore(max_restarts=max_restarts)
        self.pending: bytes | None = None  # desired state waiting for a keyring or a retry
        self.last_keyring: bytes | None = None  # retried after a root rotation
        # Canary: the attached runs, drops reported by their threads (the records are the core's).
        self._runs: dict[str, CanaryRun] = {}
        self._retired: dict[str, CanaryStats] = {}
        self._drops: queue.SimpleQueue[tuple[CanaryRun, Verdict]] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None  # the daemon's main loop sets this
        self.memory_probe: Callable[[], int] = rss_bytes

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.core.models

    @property
    def canaries(self) -> dict[str, dict[str, Any]]:
        return self.core.canaries

    # -- persistence -----------------------------------------------------------------------------

    def persist(self) -> None:
        self.store.write_state({**self.extra, **self.trust.state_fields(), **self.core.state_fields()})

    def restore(self) -> list[Note]:
        """Read the state file, re-verify trust, serve the stable models; resume or abandon an
        update that was in progress when the agent died."""
        notes: list[Note] = []
        state = self.store.read_state()
        known = {"kind", *TRUST_FIELDS, *STATE_FIELDS}
        self.extra = {k: v for k, v in state.items() if k not in known}
        for link in state.get("roots") or []:
            try:
                self.trust.update_root(link.encode())
            except EdgefleetError as exc:
                log.error("stored root rotation no longer verifies (%s)", exc)
                break
        if state.get("keyring"):
            try:
                # Accepted when it arrived: not refused for its expiry now (that is reported, as stale).
                self.trust.update_keyring(state["keyring"].encode())
            except EdgefleetError as exc:
                log.error("stored keyring no longer verifies (%s); waiting for the hub's", exc)
        self.trust.last_seq = int(state.get("last_seq", 0))
        self.trust.last_digest = state.get("last_digest")
        self.trust.time_floor = float(state.get("time_floor") or 0.0)
        expires = state.get("applied_expires_at")
        self.trust.applied_expires_at = float(expires) if isinstance(expires, int | float) else None
        self.core.load(state)
        resume, crash = self.core.restart()
        for name in list(self.core.models):
            notes += self._serve_stable(name)
        notes += self._resume_canaries()
        if crash:
            log.error(crash[0].message)
            notes += crash
        if resume is not None and self.core.update is not None:
            self.pending = resume
            log.warning("resuming the update to seq %s (restart %d of %d)", self.core.update["seq"],
                        self.core.update["restarts"], self.max_restarts)
        self.persist()
        self._gc()
        return notes

    def _serve_stable(self, name: str) -> list[Note]:
        rec = self.core.models[name]
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
                self.core.serving_fallback(name)
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
            ring = self.trust.update_keyring(raw, now=now)
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
            if self.core.forget(raw):
                self.persist()
            return [Note.of("refused", exc)]
        if verified is None:
            self.pending = None
            return []
        if self.core.reported_failed(verified.digest):
            self.pending = None
            return []  # already reported; only a new state (higher seq) is tried again
        try:
            return self._apply(verified)
        except Unavailable as exc:
            self.core.wait_for_network()
            with contextlib.suppress(StoreFailed):
                self.persist()
            return [Note.of("update_failed", exc, seq=verified.state.seq, extra={"retrying": True})]

    def _apply(self, verified: VerifiedDesired) -> list[Note]:
        desired = verified.state
        seq = desired.seq
        self.core.begin(seq=seq, digest=verified.digest, raw=verified.raw)
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
        plan = self.core.plan(seq, desired.models, specs)
        if plan.noop:
            self.trust.mark_applied(verified)
            self.pending = None
            note = self.core.noop(seq)
            self.persist()
            return [note]
        staged: dict[str, LoadedModel] = {}
        for name, entry in plan.changed.items():
            try:
                staged[name] = self._stage(name, entry, reusable=name in plan.reusable)
            except Refused as exc:
                return self._refuse(name, entry, verified, exc)
            except Unavailable as exc:
                self.core.transition(name, Step.FAIL, entry, reason=exc.reason)
                self.persist()
                raise
        canaries = {n: r for n, r in self.core.canaries.items() if n not in plan.ending}
        runs: dict[str, CanaryRun] = {}
        canary_notes: list[Note] = []
        for name in plan.retuned:  # same rollout and candidate, new mode/fraction/limits: no new preflight
            spec = specs[name]
            self.core.retune(canaries, name, desired.models[name], spec, seq)
            old = self._runs.get(name)
            if old is not None:
                runs[name] = self._new_run(old.candidate, spec)
                canary_notes.append(Note("canary_started", "retuned",
                                         f"{name} {old.version}: {spec.mode} canary now at {spec.fraction:g}",
                                         model=name, version=old.version, seq=seq,
                                         extra={"rollout": spec.rollout, "mode": spec.mode,
                                                "fraction": spec.fraction}))
        for name in plan.starting:
            run, rec, notes = self._prepare_canary(name, desired.models[name], specs[name], seq)
            canaries[name] = rec
            canary_notes += notes
            if run is not None:
                runs[name] = run
        notes = self._switch_and_commit(verified, plan, staged, canaries)
        notes += self._end_canaries(plan.ending, desired.models, seq)
        for name, run in runs.items():
            old = self._runs.pop(name, None)
            self._runs[name] = run
            self.server.attach_canary(name, run)
            if old is not None:
                old.stop()
            run.start()
        return notes + canary_notes

    def _stage(self, name: str, entry: ModelEntry, *, reusable: bool) -> LoadedModel:
        local = reusable and self.store.verify_blob(entry.sha256, entry.size)
        if local:
            # Instant rollback or promotion of the canary: the blob was downloaded, verified and
            # guarded before.
            self._transition(name, Step.LOCAL, entry)
        else:
            self._transition(name, Step.FETCH, entry)
            self.on_step("download")
            if not self.store.has_blob(entry.sha256, entry.size):
                part = self.store.partial_path(entry.sha256)
                self.fetcher.fetch(entry.url, part, size=entry.size)
                self._transition(name, Step.VERIFY, entry)
                self.on_step("verify")
                self.store.commit_blob(part, entry.sha256, entry.size)
            else:
                self._transition(name, Step.VERIFY, entry)
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
        self._transition(name, Step.STAGE, entry)
        self.on_step("stage")
        return model

    def _transition(self, name: str, step: Step, candidate: ModelEntry) -> None:
        self.core.transition(name, step, candidate)
        self.persist()

    def _refuse(
        self, name: str, entry: ModelEntry, verified: VerifiedDesired, exc: Refused
    ) -> list[Note]:
        seq = verified.state.seq
        self.core.refuse(name, entry, seq=seq, digest=verified.digest, reason=exc.reason)
        self.pending = None
        self.persist()
        self._gc()
        return [Note.of("refused", exc, model=name, version=entry.version, seq=seq)]

    def _switch_and_commit(
        self,
        verified: VerifiedDesired,
        plan: Plan,
        staged: dict[str, LoadedModel],
        canaries: dict[str, dict[str, Any]] | None = None,
    ) -> list[Note]:
        self.on_step("switch")
        before = dict(self.server.models())
        for model in staged.values():
            self.server.install(model)
        for name in plan.removed:
            self.server.remove(name)
        self.on_step("commit")
        snap, old_seq = self.core.snapshot(), (self.trust.last_seq, self.trust.last_digest)
        self.core.commit(plan, set(staged), canaries)
        self.trust.mark_applied(verified)
        self.pending = None
        try:
            self.persist()
        except StoreFailed:
            self.core.revert(snap)
            self.trust.last_seq, self.trust.last_digest = old_seq
            for name in list(self.server.models()):
                if name not in before:
                    self.server.remove(name)
            for model in before.values():
                self.server.install(model)
            raise
        self._gc()
        notes = [Note("update", "", f"{n} {m.version} active", model=n, version=m.version, seq=plan.seq)
                 for n, m in staged.items()]
        notes += [Note("removed", "", f"{n} removed", model=n, seq=plan.seq) for n in plan.removed]
        return notes

    # -- canary ----------------------------------------------------------------------------------

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
        rec = self.core.canary_record(name, entry, spec, seq)
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
            why = canary_end_reason(models.get(name), run.sha256)
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
            self.core.canary_dropped(run.name, verdict.reason, verdict.numbers)
            notes.append(Note("canary_dropped", verdict.reason, f"{run.name} {run.version}: {verdict.message}",
                              model=run.name, version=run.version,
                              extra={"rollout": run.spec.rollout, "mode": run.mode, **verdict.numbers}))
        if notes:
            self.persist()
            self._gc()
        return notes

    def canary_windows(self, cpu_wait: float | None = None) -> dict[str, dict[str, Any]]:
        """Per stable model name, the ``canary`` field of its ModelWindow for the closing window;
        ``cpu_wait`` is the device's CPU wait share over it (``SystemProbe.cpu_wait_share``), which
        marks the running canaries' windows (and their guards) starved or not."""
        for run in self._runs.values():
            run.stats.note_cpu_wait(cpu_wait)
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
        entry = self.core.fallback(name)
        if entry is None:
            return [Note("rollback_failed", "no_fallback", f"{name} has no fallback on disk", model=name)]
        if not self.store.verify_blob(entry.sha256, entry.size):
            return [Note("rollback_failed", "fallback_corrupt",
                         f"{name}: fallback {entry.version} blob is missing or corrupt", model=name)]
        model = load(name, entry, self.store.blob_path(entry.sha256), self.profile)
        self.server.install(model)
        self.core.rolled_back(name, reason)
        self.persist()
        return [Note("rollback", reason, f"{name} rolled back to {entry.version}", model=name,
                     version=entry.version)]

    # -- queries and housekeeping ----------------------------------------------------------------

    def model_state(self, name: str) -> str:
        return self.core.phase(name).value

    def _gc(self) -> None:
        self.store.gc(self.core.keep())
        if self.core.update is None:
            for p in self.store.partial.iterdir():
                with contextlib.suppress(OSError):
                    p.unlink()
