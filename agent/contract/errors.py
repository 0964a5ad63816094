"""The exception tree shared by the agent and the wire contract.

Two roots, because an operator acts differently on each::

    EdgefleetError
    ├── Refused                 we will not do this: the input is bad or breaks a policy
    │   ├── MalformedMessage    not JSON, wrong ``kind``, a field missing or of the wrong type
    │   ├── BadSignature        no valid signature by a key we trust
    │   ├── UnknownKey          signed, but by no key in the verified keyring
    │   ├── StaleSequence       ``seq`` not above the last applied one (replay / rollback attack)
    │   ├── Expired             the message's ``expires_at`` lies before the reference time
    │   ├── WrongTarget         the desired state names another device or fleet
    │   ├── IncompleteModel     a model entry lacks what the agent needs to fetch and check it
    │   ├── ModelRejected       the ONNX file is malformed, unsafe or does not load
    │   └── ConfigError         a configuration or device-profile file is wrong
    └── Unavailable             we could not do this now; retrying later may work
        ├── FetchFailed         the blob server could not be reached or answered an error
        ├── BlobMismatch        a download's size or sha256 differs from what was signed (the mirror
        │                       is wrong or tampered with; retried with backoff, never installed)
        └── StoreFailed         the local disk refused a write

Every error carries a short machine-readable ``reason`` (used in events and logs) and a message
that says what was expected, what came, and what the operator can do.
"""

from __future__ import annotations

__all__ = [
    "BadSignature",
    "BlobMismatch",
    "ConfigError",
    "EdgefleetError",
    "Expired",
    "FetchFailed",
    "IncompleteModel",
    "InferenceError",
    "MalformedMessage",
    "ModelRejected",
    "Refused",
    "StaleSequence",
    "StoreFailed",
    "Unavailable",
    "UnknownKey",
    "UnknownModel",
    "WrongTarget",
]


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class Refused(EdgefleetError):
    """The input was refused: retrying the same input will be refused again."""

    reason = "refused"


class MalformedMessage(Refused):
    reason = "malformed"


class BadSignature(Refused):
    reason = "bad_signature"


class UnknownKey(Refused):
    reason = "unknown_key"


class StaleSequence(Refused):
    reason = "stale_seq"


class Expired(Refused):
    reason = "expired"


class WrongTarget(Refused):
    reason = "wrong_target"


class IncompleteModel(Refused):
    reason = "incomplete_model"


class ModelRejected(Refused):
    reason = "model_rejected"


class ConfigError(Refused):
    reason = "config_error"


class UnknownModel(Refused):
    """An inference request named a model (or version) this device does not serve."""

    reason = "unknown_model"


class InferenceError(Refused):
    """The request's inputs do not fit the model, or the model failed on them."""

    reason = "inference_error"


class Unavailable(EdgefleetError):
    """A resource we depend on failed; the same action may succeed later."""

    reason = "unavailable"


class FetchFailed(Unavailable):
    reason = "fetch_failed"


class StoreFailed(Unavailable):
    reason = "store_failed"


class BlobMismatch(Unavailable):
    """The bytes a server sent are not the signed ones (size or sha256). Nothing of them is kept or
    installed; the signed state stays valid, so the download is retried with backoff: a mirror
    fixed after the fact serves the update without the hub re-signing anything."""

    reason = "blob_mismatch"
