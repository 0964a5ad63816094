"""The hub's API tokens on disk: ``HOME/tokens.json`` (0600), names, roles and sha256 only
(:mod:`hub.core.access`).

A home from before named tokens has ``admin.token`` alone: the first time a store opens it, that
token becomes the token ``admin`` with the role ``admin`` (its hash copied; ``admin.token`` stays
where it is, so the CLI on the hub's machine keeps reading it). Every hub process on the home
(replicas included) re-reads the file when it changes, so a token added or revoked through one of
them holds for all at their next request; writes take an exclusive lock on the home folder.

On PostgreSQL (``db``) the tokens live in the database instead, where replicas on separate hosts
share them: the first replica that finds none there stores its home's tokens (``tokens.json``,
which ``replica init`` copies); from then on the database is the one list, read at each request
and written inside the caller's transaction (with its audit entry).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import format_time
from edgefleet.hub.core.access import Token, find_token, parse_tokens, token_hash, tokens_doc
from edgefleet.hub.errors import Conflict, NotAuthorized, NotFound

if TYPE_CHECKING:
    from edgefleet.hub.db import Conn, Database

__all__ = ["MIGRATED_FROM", "TokenStore", "bearer"]

MIGRATED_FROM = "admin.token (migrated)"  # created_by of the token migrated from a single-token home
HOW = ("send Authorization: Bearer <token>: the CLI reads $EDGEFLEET_TOKEN, else HOME/admin.token; "
       "an admin makes named tokens with `edgefleet-hub token add NAME --role viewer|operator|admin`")


def bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ('' without one)."""
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class TokenStore:
    def __init__(self, path: Path, legacy: Path, db: Database | None = None) -> None:
        """``path``: the token file; ``legacy``: the single admin token of older homes; ``db``:
        keep them in this (PostgreSQL) database instead, seeded from the file."""
        self.path = path
        self.legacy = legacy
        self.db = db
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._tokens: list[Token] = []

    # -- reading ---------------------------------------------------------------------------------

    def tokens(self) -> list[Token]:
        """Every token, revoked ones included; re-read when the file changed."""
        return self._db_tokens() if self.db is not None else self._file_tokens()

    def _file_tokens(self) -> list[Token]:
        """The token file's tokens (the database store's seed too)."""
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._migrate()
                st = self.path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._seen:
                self._tokens, self._seen = self._read(), key
            return list(self._tokens)

    def _db_tokens(self, conn: Conn | None = None) -> list[Token]:
        assert self.db is not None
        doc = self.db.api_tokens(conn)
        if doc is None:
            seed = self._file_tokens()
            if conn is not None:
                self.db.put_api_tokens(conn, json.dumps(tokens_doc(seed)))
                return seed
            with self.db.tx() as c:
                if self.db.api_tokens(c) is None:  # another replica may have seeded it meanwhile
                    self.db.put_api_tokens(c, json.dumps(tokens_doc(seed)))
            doc = self.db.api_tokens()
            assert doc is not None
        try:
            return parse_tokens(json.loads(doc), "the database's api_tokens")
        except ValueError as exc:
            raise ConfigError(f"{exc}; the hub refuses every token until it is fixed") from exc

    @contextlib.contextmanager
    def _editing(self, conn: Conn | None) -> Iterator[tuple[list[Token], list[list[Token]]]]:
        """The current tokens, and a slot for the new list, written on exit: to the database in
        *conn*'s transaction, or to the file under the home's lock."""
        out: list[list[Token]] = []
        if self.db is not None:
            if conn is None:
                raise ValueError("token changes on a database store run inside the caller's transaction")
            yield self._db_tokens(conn), out
            if out:
                self.db.put_api_tokens(conn, json.dumps(tokens_doc(out[0])))
            return
        self._file_tokens()  # migrate first if need be
        with self._lock, self._exclusive():
            yield self._read(), out
            if out:
                self._write(out[0])

    def _read(self) -> list[Token]:
        try:
            return parse_tokens(json.loads(self.path.read_text(encoding="utf-8")), str(self.path))
        except ValueError as exc:
            raise ConfigError(f"{exc}; the hub refuses every token until it is fixed") from exc

    def authenticate(self, authorization: str) -> Token:
        """The active token an ``Authorization`` header carries, or :class:`NotAuthorized`
        saying what was missing: no token, one this hub does not know, or a revoked one."""
        secret = bearer(authorization)
        if not secret:
            raise NotAuthorized(f"missing admin API token; {HOW}")
        token = find_token(self.tokens(), secret)
        if token is None:
            raise NotAuthorized(f"wrong admin API token: it matches no token of this hub; {HOW}")
        if token.revoked_at is not None:
            raise NotAuthorized(f"token {token.name!r} was revoked at {format_time(token.revoked_at)}; "
                                "ask an admin for a new one (`edgefleet-hub token add`)")
        return token

    # -- writing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This thread and every process on the home: a lock on the home folder."""
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, tokens: list[Token]) -> None:
        atomic_write(self.path, (json.dumps(tokens_doc(tokens), indent=1) + "\n").encode(), mode=0o600)
        self._seen = None

    def _migrate(self) -> None:
        """First open of a home without a token file (called holding ``_lock``)."""
        with self._exclusive():
            if self.path.exists():
                return  # another process migrated first
            tokens: list[Token] = []
            try:
                secret = self.legacy.read_text().strip()
            except FileNotFoundError:
                secret = ""
            if secret:
                tokens.append(Token(name="admin", role="admin", sha256=token_hash(secret),
                                    created_at=self.legacy.stat().st_mtime, created_by=MIGRATED_FROM))
            self._write(tokens)

    def add(self, name: str, role: str, now: float, created_by: str, conn: Conn | None = None) -> tuple[Token, str]:
        """A new token (name and role already checked); returns it with its secret, which is
        nowhere else. A revoked token's name may be given again; an active one's may not."""
        secret = secrets.token_urlsafe(32)
        with self._editing(conn) as (tokens, out):
            if any(t.name == name and t.active for t in tokens):
                raise Conflict(f"token {name!r} exists; revoke it first (`edgefleet-hub token revoke {name}`) "
                               "or choose another name")
            token = Token(name=name, role=role, sha256=token_hash(secret), created_at=now, created_by=created_by)
            out.append([t for t in tokens if t.name != name] + [token])
        return token, secret

    def revoke(self, name: str, now: float, conn: Conn | None = None) -> Token:
        """Revoke the active token ``name``; the last active admin token cannot be revoked."""
        with self._editing(conn) as (tokens, out):
            token = next((t for t in tokens if t.name == name), None)
            if token is None:
                raise NotFound(f"no token named {name!r}; known: {sorted(t.name for t in tokens) or 'none'}")
            if not token.active:
                raise Conflict(f"token {name!r} is already revoked")
            if token.role == "admin" and not any(t.active and t.role == "admin" and t.name != name for t in tokens):
                raise Conflict(f"token {name!r} is the last admin token: add another one first "
                               "(`edgefleet-hub token add NAME --role admin`), or nobody could manage the hub")
            revoked = Token(**{**token.to_dict(), "revoked_at": now})
            out.append([revoked if t.name == name else t for t in tokens])
        return revoked
