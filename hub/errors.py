"""Hub errors. They extend the shared tree in :mod:`agent.contract.errors`::

    EdgefleetError
    ├── Refused
    │   └── HubRefused          the hub will not do this as asked (HTTP 4xx)
    │       ├── BadRequest      input of the wrong shape or value (400)
    │       ├── NotAuthorized   missing, wrong or revoked token (401)
    │       ├── Forbidden       the token's role does not allow the call (403)
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
    "BadRequest", "Conflict", "Forbidden", "HubNotRunning", "HubRefused", "HubTlsFailed", "NotAuthorized",
    "NotFound",
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


class Forbidden(HubRefused):
    status = 403
    reason = "forbidden"


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
    400: BadRequest, 401: NotAuthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
}  # fmt: skip
