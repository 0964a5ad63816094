"""Data capture: a sampled record of inferences (inputs, outputs, model version, request id, time),
spooled on the device and uploaded to the hub in batches, so a prediction can be traced later.

Off unless the device profile's ``[capture] sample_rate`` is above 0. Rules:

* The request path pays one random draw (:meth:`Capture.sample`); only a sampled request copies
  its arrays (:meth:`Capture.add`) into a bounded in-memory queue. Serialising, disk and network
  happen on the ``agent-capture`` thread.
* The spool is a folder of JSON Lines segments written atomically, one per flush. Its size is
  capped by ``spool_kb``: the oldest records are dropped first and counted, as are records that
  arrive while the in-memory queue is over the same budget.
* Upload: ``POST {blob_url}/api/v1/capture`` with a :data:`KIND` batch of at most
  ``batch_records`` records. A network error or 5xx keeps the batch for the next round; a 4xx
  (refused by the hub) drops it, counted, so one bad batch never blocks the spool. The hub
  ignores a record it already holds, so a retry after a lost answer stores nothing twice.

:func:`parse_batch` is the wire check the hub applies to what a device sends.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import MalformedMessage, Refused, StoreFailed, Unavailable
from edgefleet.agent.contract.wire import check_name

if TYPE_CHECKING:
    from edgefleet.agent.contract.config import AgentConfig

__all__ = ["KIND", "Capture", "CaptureSpool", "HttpCaptureSender", "make_capture", "parse_batch"]

log = logging.getLogger("edgefleet.agent.adapters.capture")

KIND = "edgefleet.capture/v1"
MAX_BATCH_RECORDS = 1000
MAX_BATCH_BYTES = 8 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}$")

Sender = Callable[[list[dict[str, Any]]], None]


def _tensor(arr: Any) -> dict[str, Any]:
    a = np.asarray(arr)
    data = a.reshape(-1).tolist() if a.dtype.kind in "biuf" else [str(x) for x in a.reshape(-1)]
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": data}


class CaptureSpool:
    """Segments ``seg-<n>.jsonl`` in one folder; one writer (the capture thread)."""

    def __init__(self, folder: Path, budget_bytes: int) -> None:
        self.folder = folder
        self.budget = budget_bytes
        self.dropped = 0
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        segs = self.segments()
        self._next = int(segs[-1].stem.split("-")[1]) + 1 if segs else 1

    def segments(self) -> list[Path]:
        return sorted(self.folder.glob("seg-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.segments())

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write ``records`` as a new segment, then drop the oldest records over the budget."""
        lines = [json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records]
        while lines and sum(map(len, lines)) > self.budget:
            lines.pop(0)
            self.dropped += 1
        if not lines:
            return
        try:
            atomic_write(self.folder / f"seg-{self._next}.jsonl", b"".join(lines), mode=0o600)
        except OSError as exc:
            self.dropped += len(lines)
            raise StoreFailed(f"cannot write capture segment in {self.folder}: {exc}") from exc
        self._next += 1
        segs = self.segments()
        total = sum(p.stat().st_size for p in segs)
        while total > self.budget and len(segs) > 1:
            oldest = segs.pop(0)
            total -= oldest.stat().st_size
            self.dropped += len(oldest.read_bytes().splitlines())
            oldest.unlink()

    def take(self, max_records: int, max_bytes: int = MAX_BATCH_BYTES) -> tuple[list[Path], list[dict[str, Any]]]:
        """The oldest whole segments holding at most ``max_records`` (at least one segment)."""
        paths: list[Path] = []
        records: list[dict[str, Any]] = []
        size = 0
        for p in self.segments():
            raw = p.read_bytes()
            lines = [ln for ln in raw.splitlines() if ln.strip()]
            if paths and (len(records) + len(lines) > max_records or size + len(raw) > max_bytes):
                break
            good = []
            for ln in lines:
                try:
                    good.append(json.loads(ln))
                except ValueError:
                    self.dropped += 1
            paths.append(p)
            records += good
            size += len(raw)
        return paths, records


class Capture:
    """Sampling on the request path, spooling and upload on its own thread."""

    def __init__(
        self,
        *,
        folder: Path,
        sample_rate: float,
        budget_bytes: int,
        send: Sender,
        clock: Callable[[], float],
        upload_seconds: float = 10.0,
        batch_records: int = 200,
        rng: random.Random | None = None,
    ) -> None:
        self.sample_rate = sample_rate
        self.budget = budget_bytes
        self.spool = CaptureSpool(folder, budget_bytes)
        self.send = send
        self.clock = clock
        self.upload_seconds = upload_seconds
        self.batch_records = max(1, min(batch_records, MAX_BATCH_RECORDS))
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, ...]] = []
        self._pending_bytes = 0
        self.counters = {"sampled": 0, "dropped": 0, "uploaded": 0, "rejected": 0}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- request path ----------------------------------------------------------------------------

    def sample(self) -> bool:
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)

    def add(self, model: str, version: str, sha256: str, request_id: str,
            inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Keep one sampled request; its arrays are copied, the caller may reuse them."""
        ins = {k: np.array(v, copy=True) for k, v in inputs.items()}
        outs = {k: np.array(v, copy=True) for k, v in outputs.items()}
        nbytes = sum(a.nbytes for a in ins.values()) + sum(a.nbytes for a in outs.values())
        with self._lock:
            self.counters["sampled"] += 1
            if self._pending_bytes + nbytes > self.budget:
                self.counters["dropped"] += 1
                return
            self._pending.append((self.clock(), model, version, sha256, request_id, ins, outs))
            self._pending_bytes += nbytes

    # -- capture thread --------------------------------------------------------------------------

    def flush(self) -> int:
        """Move pending records to the spool; return how many."""
        with self._lock:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return 0
        records = [
            {"request_id": rid, "time": t, "model": m, "version": v, "sha256": sha,
             "inputs": {k: _tensor(a) for k, a in ins.items()},
             "outputs": {k: _tensor(a) for k, a in outs.items()}}
            for t, m, v, sha, rid, ins, outs in pending
        ]
        self.spool.append(records)
        return len(records)

    def upload(self) -> int:
        """Send spooled batches until the spool is empty or the hub is unreachable."""
        sent = 0
        while True:
            paths, records = self.spool.take(self.batch_records)
            if not paths:
                return sent
            if records:
                try:
                    self.send(records)
                except Unavailable as exc:
                    log.info("capture upload deferred: %s", exc)
                    return sent
                except Refused as exc:
                    self.counters["rejected"] += len(records)
                    log.warning("hub refused a capture batch of %d records, dropped: %s", len(records), exc)
                else:
                    self.counters["uploaded"] += len(records)
                    sent += len(records)
            for p in paths:
                p.unlink(missing_ok=True)

    def dropped(self) -> int:
        return self.counters["dropped"] + self.spool.dropped

    def run_once(self) -> None:
        try:
            self.flush()
        except StoreFailed as exc:
            log.error("%s", exc)
        self.upload()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.upload_seconds)
            self._wake.clear()
            try:
                self.run_once()
            except Exception:  # the thread must outlive any single failure
                log.exception("capture upload round failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="agent-capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Spool what is pending (it is uploaded after the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            self.flush()
        except StoreFailed as exc:
            log.error("%s", exc)


class HttpCaptureSender:
    """POSTs batches to the hub. Network errors and 5xx are :class:`Unavailable`, 4xx :class:`Refused`."""

    def __init__(self, url: str, fleet: str, device: str, *, token: str | None = None, timeout: float = 10.0,
                 verify: Any = True) -> None:
        import httpx

        self._httpx = httpx
        self.url = url
        self.fleet = fleet
        self.device = device
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout, headers=headers, verify=verify)

    def __call__(self, records: list[dict[str, Any]]) -> None:
        body = {"kind": KIND, "fleet": self.fleet, "device": self.device, "records": records}
        try:
            resp = self._client.post(self.url, json=body)
        except self._httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the hub at {self.url}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 500:
            raise Unavailable(f"hub answered {resp.status_code} to a capture upload")
        if resp.status_code >= 400:
            raise Refused(f"hub refused the capture upload ({resp.status_code}): {resp.text[:300]}",
                          reason="capture_refused")


def _verify(config: AgentConfig) -> Any:
    """The hub's device CA for an https hub (as blob downloads pin it), else the system CAs."""
    if config.ca_file is not None and config.blob_url.startswith("https://"):
        import ssl

        return ssl.create_default_context(cafile=str(config.ca_file))
    return True


def make_capture(config: AgentConfig, clock: Callable[[], float]) -> Capture | None:
    """The agent's capture per its profile, or None when the profile leaves it off."""
    p = config.profile
    if p.capture_sample_rate <= 0:
        return None
    return Capture(
        folder=config.state_dir / "capture",
        sample_rate=p.capture_sample_rate,
        budget_bytes=p.capture_spool_kb * 1024,
        send=HttpCaptureSender(config.blob_url.rstrip("/") + "/api/v1/capture", config.fleet, config.device,
                               token=config.capture_token(), verify=_verify(config)),
        clock=clock,
        upload_seconds=p.capture_upload_seconds,
        batch_records=p.capture_batch_records,
    )


# -- wire check (the hub applies it) ------------------------------------------------------------


def _str(d: Mapping[str, Any], key: str, ctx: str, max_len: int = 128) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise MalformedMessage(f"{ctx}: {key} must be a string of 1-{max_len} characters, got {v!r}")
    return v


def _tensors(obj: object, ctx: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{ctx} must be an object of tensor name -> tensor")
    for name, t in obj.items():
        if (not isinstance(t, dict) or not isinstance(t.get("shape"), list)
                or not isinstance(t.get("data"), list) or not isinstance(t.get("dtype"), str)):
            raise MalformedMessage(f"{ctx}[{name!r}] needs dtype (string), shape (list) and data (list)")
    return obj


def parse_batch(obj: Mapping[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """Check an uploaded batch; return ``(fleet, device, records)`` or raise MalformedMessage."""
    if obj.get("kind") != KIND:
        raise MalformedMessage(f"expected kind {KIND!r}, got {obj.get('kind')!r}")
    fleet = check_name(obj.get("fleet"), "fleet")
    device = check_name(obj.get("device"), "device")
    records = obj.get("records")
    if not isinstance(records, list) or not records or len(records) > MAX_BATCH_RECORDS:
        raise MalformedMessage(f"records must be a list of 1-{MAX_BATCH_RECORDS} capture records")
    out = []
    for i, r in enumerate(records):
        ctx = f"records[{i}]"
        if not isinstance(r, dict):
            raise MalformedMessage(f"{ctx} must be an object")
        t = r.get("time")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise MalformedMessage(f"{ctx}: time must be a number (epoch seconds), got {t!r}")
        sha = _str(r, "sha256", ctx)
        if not _HEX64.match(sha):
            raise MalformedMessage(f"{ctx}: sha256 must be 64 lowercase hex digits")
        out.append({
            "request_id": _str(r, "request_id", ctx),
            "time": float(t),
            "model": check_name(r.get("model"), f"{ctx} model"),
            "version": _str(r, "version", ctx),
            "sha256": sha,
            "inputs": _tensors(r.get("inputs"), f"{ctx}.inputs"),
            "outputs": _tensors(r.get("outputs"), f"{ctx}.outputs"),
        })
    return fleet, device, out
