"""Hub errors. They extend the shared tree in :mod:`agent.contract.errors`::

    EdgefleetError
    ├── Refused
    │   └── HubRefused          the hub will not do this as asked (HTTP 4xx)
    │       ├── BadRequest      input of the wrong shape or value (400)
    │       ├── NotAuthorized   missing or wrong admin token (401)
    │       ├── NotFound        no such model, version or device (404)
    │       └── Conflict        it exists already, differently (409)
    └── Unavailable
        ├── HubNotRunning       the CLI found no hub answering at the address it knows
        └── HubTlsFailed        the hub answered over TLS with a certificate we do not trust

Each error maps to one HTTP status, so the admin API and the CLI speak the same language.
"""

from __future__ import annotations

from edgefleet.agent.contract.errors import Refused, Unavailable

__all__ = [
    "BadRequest", "Conflict", "HubNotRunning", "HubRefused", "HubTlsFailed", "NotAuthorized", "NotFound",
]


class HubRefused(Refused):
    status = 400
    reason = "refused"


class BadRequest(HubRefused):
    status = 400
    reason = "bad_request"


class NotAuthorized(HubRefused):
    status = 401
    reason = "not_authorized"


class NotFound(HubRefused):
    status = 404
    reason = "not_found"


class Conflict(HubRefused):
    status = 409
    reason = "conflict"


class HubNotRunning(Unavailable):
    reason = "hub_not_running"


class HubTlsFailed(Unavailable):
    reason = "tls_failed"


BY_STATUS: dict[int, type[HubRefused]] = {
    400: BadRequest, 401: NotAuthorized, 404: NotFound, 409: Conflict,
}  # fmt: skip
