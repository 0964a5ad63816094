"""The elected controller: the work exactly one hub replica does at a time.

Every replica ingests telemetry and serves the admin API and blobs. Judging rollouts, drift alarm
state (and the alerts and rollbacks it causes), re-signing desired states before they expire,
telemetry retention and keyring alerts run on one replica only: the one holding the controller
lock (:meth:`edgefleet.hub.db.Database.leader_lock`: a PostgreSQL session advisory lock on a
connection of its own, or an flock beside an SQLite file).

Each replica that takes the lock bumps the role's **fencing epoch** in the database. Every write
the controller makes checks, inside its own transaction, that the epoch is still its own
(:meth:`Controller.fence`); write transactions are exclusive, so no replica can take the role
between that check and the commit. A leader that was paused (SIGSTOP, a VM migration, a long GC)
and wakes after another replica took over therefore cannot write: its transaction is refused
with :class:`Fenced`, and its next round sees that it lost the lock.

How a replica takes over:

- the leader died (SIGKILL, crash, host down with its TCP connection reset): PostgreSQL ends its
  session and releases the lock; the next round of any replica (every ``interval`` seconds) takes it.
- the leader stopped answering but its connections stay open (SIGSTOP, a hung host): its
  heartbeat, stamped by the database's clock every round, grows older than ``lease_seconds``;
  a replica that sees this ends the stale leader's sessions (``pg_terminate_backend``, by their
  application name), which releases its lock, and takes it at its next round. A write transaction
  it left open is ended by the server's ``idle_in_transaction_session_timeout`` (the hub sets it
  to the lease on its sessions), so it blocks the other replicas' writes for at most that long.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from edgefleet.agent.contract.errors import EdgefleetError
from edgefleet.hub.db import Conn, Database

__all__ = ["ROLE", "Controller", "Fenced", "replica_name"]

log = logging.getLogger("edgefleet.hub.services.controller")
ROLE = "controller"


class Fenced(EdgefleetError):
    """This replica is not (or no longer) the controller: its write was refused."""


def replica_name(replica: str | None) -> str:
    """What names this process in the controller row and on its database sessions: the replica
    name (``serve --replica``) or the host name, and the pid (unique while it runs)."""
    return f"edgefleet-hub {replica or socket.gethostname()}:{os.getpid()}"[:63]


class Controller:
    def __init__(self, db: Database, holder: str, *, lease_seconds: float = 10.0, interval: float = 1.0,
                 on_elected: Callable[[int], None] | None = None,
                 on_demoted: Callable[[str], None] | None = None) -> None:
        """Its ports: the database (the lock, the role's row, session termination), and two
        callbacks run on the controller thread: ``on_elected(epoch)`` once this replica leads,
        ``on_demoted(reason)`` once it stopped leading."""
        if lease_seconds <= 2 * interval:
            raise ValueError(f"lease_seconds ({lease_seconds}) must be more than two rounds ({interval} s each)")
        self.db = db
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.interval = interval
        self._on_elected = on_elected or (lambda epoch: None)
        self._on_demoted = on_demoted or (lambda reason: None)
        self._lock = db.leader_lock(ROLE)
        self._epoch: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.elections = 0  # times this replica took the role
        self.takeovers = 0  # stale leaders whose sessions this replica ended

    @property
    def leading(self) -> bool:
        return self._epoch is not None

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def start(self) -> None:
        self.step()  # a single replica leads from its first second
        self._thread = threading.Thread(target=self._loop, name="hub-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.leading:
            self._demote("stopping")
        self._lock.release()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception:
                log.exception("controller election round failed")

    def step(self) -> None:
        """One round: a leader stamps its heartbeat (or finds it lost the role); another replica
        takes a free lock, or ends the sessions of a leader whose heartbeat is older than the lease."""
        if self._epoch is not None:
            try:
                ok = self._lock.held() and self.db.controller_heartbeat(ROLE, self._epoch)
            except Exception as exc:  # the database is away: we cannot tell whether we still lead
                log.warning("controller heartbeat failed: %s", exc)
                ok = self._lock.held()
            if not ok:
                self._demote("lost the controller lock (another replica took over)")
            return
        if self._lock.try_acquire():
            self._epoch = self.db.take_controller(ROLE, self.holder)
            self.elections += 1
            log.warning("%s is the controller now (epoch %d)", self.holder, self._epoch)
            try:
                self._on_elected(self._epoch)
            except Exception:
                log.exception("taking over as controller failed")
            return
        row = self.db.controller(ROLE)
        if row is not None and row["holder"] != self.holder and float(row["age"]) > self.lease_seconds:
            n = self.db.terminate_holder(str(row["holder"]))
            self.takeovers += 1
            log.warning("controller %s (epoch %d) has not stamped its heartbeat for %.1f s (lease %.0f s): "
                        "ended its %d database sessions", row["holder"], row["epoch"], row["age"],
                        self.lease_seconds, n)

    def _demote(self, reason: str) -> None:
        epoch, self._epoch = self._epoch, None
        self._lock.release()
        log.warning("%s is no longer the controller (epoch %s): %s", self.holder, epoch, reason)
        try:
            self._on_demoted(reason)
        except Exception:
            log.exception("stepping down as controller failed")

    def fence(self, conn: Conn) -> None:
        """Raise :class:`Fenced` unless this replica's epoch still holds the role, as the open
        write transaction sees the database."""
        epoch = self._epoch
        if epoch is None:
            raise Fenced(f"{self.holder} is not the controller")
        stored = self.db.controller_epoch(conn, ROLE)
        if stored != epoch:
            self._demote(f"fenced: epoch {stored} in the database, ours {epoch}")
            raise Fenced(f"{self.holder} lost the controller role: epoch {stored} in the database, ours {epoch}")

    def describe(self) -> dict[str, Any]:
        """What ``status`` and ``/metrics`` say about the election."""
        row = self.db.controller(ROLE)
        return {"replica": self.holder, "leading": self.leading, "epoch": self._epoch,
                "leader": row["holder"] if row else None, "leader_epoch": row["epoch"] if row else None,
                "heartbeat_age_seconds": round(float(row["age"]), 3) if row else None,
                "lease_seconds": self.lease_seconds, "elections": self.elections, "takeovers": self.takeovers}
