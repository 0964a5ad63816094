"""Store-and-forward for telemetry windows: an on-disk spool and the bookkeeping of what is in flight.

Layout under ``<state_dir>/spool/``::

    00000000000000000042.json   one window report per file, named by its window ``seq``
    dropped                     the number of windows ever dropped because the spool was full

Invariants:

- A window is on disk (temp file, fsync, rename, fsync the directory) *before* it is published,
  so a kill -9 at any instant loses no window that :meth:`Spool.put` returned for.
- Files are sent in ``seq`` order and a file is deleted only when the broker acknowledged its
  publish (QoS 1 PUBACK, seen through paho's ``on_publish`` with the message id).
- The spool holds at most ``max_bytes`` of window files. When a new window does not fit, the
  *oldest* windows that are not in flight are deleted first and counted in ``dropped``; the newest
  window is always kept. The counter is persisted, so the next window reports it even after a
  restart (the hub sees the matching gap in ``seq``).

:class:`Outbox` is pure bookkeeping (no I/O, time passed in): which seqs are in flight under which
MQTT message id, which are due for (re)sending. The agent's main thread is the only caller of both
classes; paho's network thread only enqueues acknowledged message ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import StoreFailed

__all__ = ["Outbox", "Spool"]

SUFFIX = ".json"


class Spool:
    """Window files on disk, oldest first, bounded in bytes."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be positive, got {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreFailed(f"cannot create the telemetry spool {directory}: {exc}") from exc
        found: dict[int, int] = {}
        for p in directory.iterdir():
            if p.suffix == SUFFIX and p.stem.isdigit():
                found[int(p.stem)] = p.stat().st_size
            elif p.name.startswith("."):  # a temp file left by a kill during a write
                with contextlib.suppress(OSError):
                    p.unlink()
        # Kept in ascending seq order (windows are put with growing seqs), so seqs() needs no sort.
        self._sizes: dict[int, int] = dict(sorted(found.items()))
        self._dropped_path = directory / "dropped"
        try:
            self.dropped_total = int(self._dropped_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            self.dropped_total = 0

    # -- reading ---------------------------------------------------------------------------------

    def seqs(self) -> list[int]:
        """Spooled window seqs, oldest first."""
        return list(self._sizes)

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._sizes)

    def max_seq(self) -> int:
        return max(self._sizes, default=0)

    def path(self, seq: int) -> Path:
        return self.directory / f"{seq:020d}{SUFFIX}"

    def read(self, seq: int) -> bytes:
        return self.path(seq).read_bytes()

    # -- writing ---------------------------------------------------------------------------------

    def put(self, seq: int, payload: bytes, *, keep: Iterable[int] = ()) -> list[int]:
        """Write one window durably, then make room; return the seqs dropped to make room.

        ``keep`` names seqs that must not be dropped (in flight: the broker may still acknowledge
        them, and a window both delivered and counted as dropped would make the count lie).
        Raises :class:`StoreFailed` if the disk refuses the write.
        """
        atomic_write(self.path(seq), payload, mode=0o600)
        in_order = not self._sizes or seq > next(reversed(self._sizes))
        self._sizes[seq] = len(payload)
        if not in_order:
            self._sizes = dict(sorted(self._sizes.items()))
        protected = {seq, *keep}
        dropped: list[int] = []
        total = self.size_bytes
        for old in self.seqs():
            if total <= self.max_bytes:
                break
            if old in protected:
                continue
            total -= self._sizes[old]
            self._remove(old)
            dropped.append(old)
        if dropped:
            self.dropped_total += len(dropped)
            atomic_write(self._dropped_path, f"{self.dropped_total}\n".encode(), mode=0o600)
        return dropped

    def remove(self, seq: int) -> None:
        """Forget a window the broker acknowledged."""
        if seq in self._sizes:
            self._remove(seq)

    def _remove(self, seq: int) -> None:
        self._sizes.pop(seq, None)
        self.path(seq).unlink(missing_ok=True)


@dataclass
class Outbox:
    """Which spooled seqs are in flight (published, not yet acknowledged: by the hub's
    ``TelemetryAck`` once it sends them, else by the broker's PUBACK) under which message id.

    ``due`` yields the oldest spooled seqs that are not in flight, up to ``max_inflight`` in flight
    at once, plus any in flight for longer than ``resend_after`` seconds (paho resends unacknowledged
    QoS 1 messages itself on reconnect; this is the backstop, and the hub drops duplicates).
    """

    max_inflight: int = 32
    resend_after: float = 60.0
    _by_mid: dict[int, int] = field(default_factory=dict)
    _sent_at: dict[int, float] = field(default_factory=dict)  # seq -> time of last publish

    def in_flight(self) -> set[int]:
        return set(self._sent_at)

    def due(self, spooled: list[int], now: float) -> list[int]:
        out: list[int] = []
        budget = self.max_inflight - len(self._sent_at)
        unseen = len(self._sent_at)  # in-flight seqs not met yet: until then we cannot stop early
        for seq in spooled:
            if budget <= 0 and unseen <= 0:
                break  # a long backlog costs O(in flight), not O(spool), per call
            sent = self._sent_at.get(seq)
            if sent is None:
                if budget > 0:
                    budget -= 1
                    out.append(seq)
            else:
                unseen -= 1
                if now - sent >= self.resend_after:
                    out.append(seq)
        return out

    def sent(self, seq: int, mid: int, now: float) -> None:
        self._by_mid[mid] = seq
        self._sent_at[seq] = now

    def acked(self, mid: int) -> int | None:
        """The seq a PUBACK for ``mid`` acknowledges, or ``None`` if it is not ours."""
        seq = self._by_mid.pop(mid, None)
        if seq is not None:
            self._sent_at.pop(seq, None)
            for m in [m for m, s in self._by_mid.items() if s == seq]:  # older copies of a resend
                del self._by_mid[m]
        return seq

    def forget(self, seqs: Iterable[int]) -> None:
        gone = set(seqs)
        for s in gone:
            self._sent_at.pop(s, None)
        for m in [m for m, s in self._by_mid.items() if s in gone]:
            del self._by_mid[m]
