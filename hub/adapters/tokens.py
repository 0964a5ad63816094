"""The hub's API tokens on disk: ``HOME/tokens.json`` (0600), names, roles and sha256 only
(:mod:`hub.core.access`).

A home from before named tokens has ``admin.token`` alone: the first time a store opens it, that
token becomes the token ``admin`` with the role ``admin`` (its hash copied; ``admin.token`` stays
where it is, so the CLI on the hub's machine keeps reading it). Every hub process on the home
(replicas included) re-reads the file when it changes, so a token added or revoked through one of
them holds for all at their next request; writes take an exclusive lock on the home folder.
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

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import format_time
from edgefleet.hub.core.access import Token, find_token, parse_tokens, token_hash, tokens_doc
from edgefleet.hub.errors import Conflict, NotAuthorized, NotFound

__all__ = ["MIGRATED_FROM", "TokenStore", "bearer"]

MIGRATED_FROM = "admin.token (migrated)"  # created_by of the token migrated from a single-token home
HOW = ("send Authorization: Bearer <token>: the CLI reads $EDGEFLEET_TOKEN, else HOME/admin.token; "
       "an admin makes named tokens with `edgefleet-hub token add NAME --role viewer|operator|admin`")


def bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ('' without one)."""
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class TokenStore:
    def __init__(self, path: Path, legacy: Path) -> None:
        """``path``: the token file; ``legacy``: the single admin token of older homes."""
        self.path = path
        self.legacy = legacy
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._tokens: list[Token] = []

    # -- reading ---------------------------------------------------------------------------------

    def tokens(self) -> list[Token]:
        """Every token, revoked ones included; re-read when the file changed."""
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

    def add(self, name: str, role: str, now: float, created_by: str) -> tuple[Token, str]:
        """A new token (name and role already checked); returns it with its secret, which is
        nowhere else. A revoked token's name may be given again; an active one's may not."""
        self.tokens()  # migrate first if need be
        secret = secrets.token_urlsafe(32)
        with self._lock, self._exclusive():
            tokens = self._read()
            if any(t.name == name and t.active for t in tokens):
                raise Conflict(f"token {name!r} exists; revoke it first (`edgefleet-hub token revoke {name}`) "
                               "or choose another name")
            token = Token(name=name, role=role, sha256=token_hash(secret), created_at=now, created_by=created_by)
            self._write([t for t in tokens if t.name != name] + [token])
        return token, secret

    def revoke(self, name: str, now: float) -> Token:
        """Revoke the active token ``name``; the last active admin token cannot be revoked."""
        self.tokens()
        with self._lock, self._exclusive():
            tokens = self._read()
            token = next((t for t in tokens if t.name == name), None)
            if token is None:
                raise NotFound(f"no token named {name!r}; known: {sorted(t.name for t in tokens) or 'none'}")
            if not token.active:
                raise Conflict(f"token {name!r} is already revoked")
            if token.role == "admin" and not any(t.active and t.role == "admin" and t.name != name for t in tokens):
                raise Conflict(f"token {name!r} is the last admin token: add another one first "
                               "(`edgefleet-hub token add NAME --role admin`), or nobody could manage the hub")
            revoked = Token(**{**token.to_dict(), "revoked_at": now})
            self._write([revoked if t.name == name else t for t in tokens])
        return revoked
