"""Who may call the admin API: named tokens, each with a role. Pure: the token file's content in,
decisions out (the file itself is :mod:`hub.adapters.tokens`).

A token is 32 random bytes (URL-safe base64) shown once when it is made; the hub keeps its name,
role and sha256 only. The name is who acts: it is the ``actor`` of every audit entry the token's
requests write.

Roles, each allowing what the one before it does:

    viewer     read: every GET of the admin API and /metrics
    operator   + publish, deploy, rollouts (start, pause, resume, abort, promote), rollback
    admin      + devices (add, revoke) and tokens (add, list, revoke)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.wire import check_name
from edgefleet.hub.errors import BadRequest

__all__ = [
    "RESERVED_NAMES", "ROLES", "Token", "allows", "check_role", "check_token_name", "find_token",
    "parse_tokens", "token_hash", "tokens_doc",
]

ROLES = ("viewer", "operator", "admin")
# Actors the hub itself writes into the audit log: no token may act under their names.
RESERVED_NAMES = frozenset({"rollout-gate", "drift-rollback"})
FORMAT = "edgefleet.tokens/v1"


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    sha256: str  # of the token's text (UTF-8)
    created_at: float
    created_by: str = ""
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "sha256": self.sha256, "created_at": self.created_at,
                "created_by": self.created_by, "revoked_at": self.revoked_at}

    def public(self) -> dict[str, Any]:
        """What ``token list`` shows: everything but the hash."""
        return {k: v for k, v in self.to_dict().items() if k != "sha256"}


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def allows(role: str, need: str) -> bool:
    """``role`` may do what needs ``need``."""
    return ROLES.index(role) >= ROLES.index(need)


def check_role(value: object) -> str:
    if value not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}, got {value!r}")
    return str(value)


def check_token_name(value: object) -> str:
    try:
        name = check_name(value, "token name")
    except MalformedMessage as exc:
        raise BadRequest(str(exc)) from exc
    if name in RESERVED_NAMES:
        raise BadRequest(f"token name {name!r} is reserved: the hub writes it into the audit log itself "
                         f"({', '.join(sorted(RESERVED_NAMES))})")
    return name


def find_token(tokens: Iterable[Token], secret: str) -> Token | None:
    """The token whose hash is ``secret``'s (revoked ones included: the caller says why it
    refuses). Every entry is compared, in constant time each."""
    digest = token_hash(secret).encode()
    found = None
    for t in tokens:
        if hmac.compare_digest(digest, t.sha256.encode()):
            found = t
    return found


def parse_tokens(doc: Mapping[str, Any], where: str) -> list[Token]:
    """The tokens of a token file's parsed JSON; anything else than what :func:`tokens_doc`
    writes is refused with ``where`` in the message."""
    if doc.get("kind") != FORMAT or not isinstance(doc.get("tokens"), list):
        raise ValueError(f"{where}: expected {{\"kind\": {FORMAT!r}, \"tokens\": [...]}}")
    out: list[Token] = []
    for i, t in enumerate(doc["tokens"]):
        try:
            token = Token(name=str(t["name"]), role=check_role(t["role"]), sha256=str(t["sha256"]),
                          created_at=float(t["created_at"]), created_by=str(t.get("created_by") or ""),
                          revoked_at=None if t.get("revoked_at") is None else float(t["revoked_at"]))
        except (KeyError, TypeError, ValueError, BadRequest) as exc:
            raise ValueError(f"{where}: token #{i + 1} is malformed ({exc})") from exc
        if len(token.sha256) != 64:
            raise ValueError(f"{where}: token {token.name!r} has no sha256 of 64 hex digits")
        out.append(token)
    return out


def tokens_doc(tokens: Iterable[Token]) -> dict[str, Any]:
    return {"kind": FORMAT, "tokens": [t.to_dict() for t in tokens]}
