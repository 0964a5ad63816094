"""JSON for the hub's ingest hot path, on orjson: parse device messages (:mod:`hub.db` re-encodes
what it stores of them, with orjson too).

:func:`loads_object` takes what :func:`agent.contract.wire.parse_json_object` takes and refuses at least
what it refuses: more than ``MAX_MESSAGE_BYTES``, anything but one JSON object, ``NaN`` and
``Infinity``. It is stricter (RFC 8259 as written): UTF-8 only (no UTF-16/32, no byte order
mark), no lone surrogates, no number that overflows a double (``1e400``; the stdlib reads it as
infinity). Integers beyond 64 bits come back as floats, so a field that must be an integer
(``seq``, ``requests``...) is refused by the wire readers as "must be int, got float".

Signed envelopes (:mod:`agent.contract.envelope`, :mod:`agent.core.trust`) keep the stdlib parser and
:func:`agent.contract.wire.canonical_json`: what is verified must be read one way on both sides. This
module is for messages the hub only stores and sums.
"""

from __future__ import annotations

from typing import Any

import orjson

from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.wire import MAX_MESSAGE_BYTES

__all__ = ["loads_object"]


def loads_object(data: bytes, what: str = "message") -> dict[str, Any]:
    """Parse ``data`` as one JSON object, or raise :class:`MalformedMessage` saying why."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"{what} is {len(data)} bytes, more than the {MAX_MESSAGE_BYTES} allowed")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"{what} is not UTF-8 JSON (RFC 8259): {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj
