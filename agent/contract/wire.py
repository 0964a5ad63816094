"""The wire contract between hub and agent: canonical JSON, topics and message kinds.

Pure: no sockets, threads or clock. Every message is a UTF-8 JSON object whose ``kind`` names
its schema and version (``edgefleet.desired/v1``). Each kind is a frozen dataclass with
``from_dict`` / ``to_dict``; fields this version does not know are kept in ``extra`` and written
back unchanged, so an older agent can relay a newer hub's message without losing anything.

Times travel as RFC 3339 strings in UTC and live in the dataclasses as float seconds since the
epoch. ``from_dict`` raises :class:`~agent.contract.errors.MalformedMessage` naming the field, what was
expected and what came.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Self, TypeVar

from edgefleet.agent.contract.errors import MalformedMessage

__all__ = [
    "KINDS",
    "DesiredState",
    "Event",
    "FeatureReference",
    "KeyEntry",
    "Keyring",
    "ModelEntry",
    "ModelReport",
    "ModelWindow",
    "Reference",
    "Reported",
    "Status",
    "TelemetryAck",
    "TelemetryWindow",
    "TensorSpec",
    "Topics",
    "canonical_json",
    "check_name",
    "format_time",
    "parse_message",
    "parse_time",
]

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOPIC_PREFIX = "edgefleet/v1/"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The QoS agents subscribe at (desired, acked, keyring, roots). Every one of these is state, the
# latest message all that counts: desired, keyring and roots are retained (a reconnect brings them
# again), and a lost ``acked`` only means the window is re-sent and acknowledged again. Agents keep
# clean sessions, so QoS 1 would buy nothing a reconnect does not — and on NATS's MQTT layer each
# QoS 1 subscription is a JetStream consumer, which cannot be created while a node of the cluster
# is down (seen here: SUBACKs 5 s late or refused for over a minute), so devices that reconnect
# after a node died would get no desired state. QoS 0 subscriptions take retained messages from any
# surviving node at once. Devices still publish at QoS 1.
SUBSCRIBE_QOS = 0


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a valid device id, fleet or model name, else raise."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise MalformedMessage(
            f"{what} must be 1-64 characters of A-Z a-z 0-9 _ . - (no MQTT wildcards or '/'), "
            f"got {value!r}",
            reason="bad_name",
        )
    return value


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` the one way both sides sign: sorted keys, no spaces, UTF-8, no NaN."""
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except ValueError as exc:  # NaN or infinity
        raise MalformedMessage(f"cannot encode as canonical JSON: {exc}") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(data: bytes | str, what: str = "message") -> dict[str, Any]:
    """Parse bytes as one JSON object, with a size cap, or raise MalformedMessage."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(
            f"{what} is {len(data)} bytes, more than the {MAX_MESSAGE_BYTES} allowed"
        )
    try:
        # NaN and Infinity are not JSON (RFC 8259) and canonical_json cannot write them back.
        obj = json.loads(data, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessage(f"{what} is not UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def format_time(t: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC (``2026-11-28T04:48:47.123Z``)."""
    dt = datetime.fromtimestamp(t, tz=UTC)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        text += f".{dt.microsecond // 1000:03d}"
    return text + "Z"


def parse_time(value: object, what: str = "time") -> float:
    if not isinstance(value, str):
        raise MalformedMessage(f"{what} must be an RFC 3339 string, got {value!r}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedMessage(f"{what} must be an RFC 3339 time, got {value!r}") from exc
    if dt.tzinfo is None:
        raise MalformedMessage(f"{what} must carry a time zone (use 'Z'), got {value!r}")
    return dt.timestamp()


# --- field readers ----------------------------------------------------------------------------

T = TypeVar("T")


def _get(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], ctx: str) -> Any:
    if key not in d:
        raise MalformedMessage(f"{ctx}: field {key!r} is missing", reason="missing_field")
    value = d[key]
    # bool is an int in Python; a JSON true is never a valid count or seq.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise MalformedMessage(f"{ctx}: field {key!r} must not be a boolean, got {value!r}")
    if not isinstance(value, types):
        names = (
            "/".join(t.__name__ for t in types) if isinstance(types, tuple) else types.__name__
        )
        raise MalformedMessage(
            f"{ctx}: field {key!r} must be {names}, got {type(value).__name__} {value!r:.60}"
        )
    # JSON has no integer limit; the stores on both sides (SQLite) and most readers stop at int64.
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise MalformedMessage(f"{ctx}: field {key!r} must fit in 64 bits, got {value:.3e}")
    return value


def _opt(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], ctx: str) -> Any:
    if d.get(key) is None:
        return None
    return _get(d, key, types, ctx)


def _int(d: Mapping[str, Any], key: str, ctx: str, minimum: int = 0) -> int:
    value: int = _get(d, key, int, ctx)
    if value < minimum:
        raise MalformedMessage(f"{ctx}: field {key!r} must be >= {minimum}, got {value}")
    return value


def _num(d: Mapping[str, Any], key: str, ctx: str) -> float:
    value = float(_get(d, key, (int, float), ctx))
    if not math.isfinite(value):
        raise MalformedMessage(f"{ctx}: field {key!r} must be finite, got {value}")
    return value


def _extra(d: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in known}


def _map(
    d: Mapping[str, Any], key: str, ctx: str, parse: Callable[[Mapping[str, Any], str], T]
) -> dict[str, T]:
    raw = _get(d, key, dict, ctx)
    out: dict[str, T] = {}
    for name, value in raw.items():
        check_name(name, f"{ctx}: key of {key!r}")
        if not isinstance(value, dict):
            raise MalformedMessage(f"{ctx}: {key}[{name!r}] must be an object")
        out[name] = parse(value, f"{ctx}.{key}[{name}]")
    return out


def _list(
    d: Mapping[str, Any], key: str, ctx: str, parse: Callable[[Mapping[str, Any], str], T]
) -> list[T]:
    raw = _get(d, key, list, ctx)
    out: list[T] = []
    for i, value in enumerate(raw):
        if not isinstance(value, dict):
            raise MalformedMessage(f"{ctx}: {key}[{i}] must be an object")
        out.append(parse(value, f"{ctx}.{key}[{i}]"))
    return out


def _check_kind(d: Mapping[str, Any], kind: str) -> None:
    got = d.get("kind")
    if got != kind:
        raise MalformedMessage(f"expected kind {kind!r}, got {got!r}", reason="wrong_kind")


# --- building blocks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, element type (numpy name) and shape."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset({"name", "dtype", "shape"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ctx: str = "tensor") -> Self:
        shape = _get(d, "shape", list, ctx)
        for dim in shape:
            if dim is not None and not isinstance(dim, int | str):
                raise MalformedMessage(f"{ctx}: shape entries must be int, string or null")
        return cls(
            name=_get(d, "name", str, ctx),
            dtype=_get(d, "dtype", str, ctx),
            shape=tuple(shape),
            extra=_extra(d, cls._known),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class FeatureReference:
    """Training distribution of one input feature: ``len(edges) == len(freqs) + 1``."""

    name: str
    edges: tuple[float, ...]
    freqs: tuple[float, ...]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset({"name", "edges", "freqs"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ctx: str = "feature") -> Self:
        edges = tuple(float(x) for x in _get(d, "edges", list, ctx))
        freqs = tuple(float(x) for x in _get(d, "freqs", list, ctx))
        if len(edges) != len(freqs) + 1 or len(freqs) < 1:
            raise MalformedMessage(
                f"{ctx}: expected len(edges) == len(freqs) + 1 >= 2, "
                f"got {len(edges)} edges and {len(freqs)} freqs"
            )
        if any(b < a for a, b in itertools.pairwise(edges)):
            raise MalformedMessage(f"{ctx}: edges must be non-decreasing")
        return cls(
            name=_get(d, "name", str, ctx), edges=edges, freqs=freqs, extra=_extra(d, cls._known)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "name": self.name,
            "edges": list(self.edges),
            "freqs": list(self.freqs),
        }


TENSOR_STATS = ("channel", "mean", "std", "saturated", "confidence", "value")  # what a tensor feature measures
MAX_CATEGORIES = 64  # named categories (bins) of one categorical feature, at most
MAX_KNOWN = 1024  # further training categories a reference lists, so devices tell "other" from unseen


def _check_categories(c: FeatureReference, ctx: str) -> None:
    names, known = c.extra.get("categories"), c.extra.get("known", [])
    if (not isinstance(names, list) or not all(isinstance(x, str) for x in names)
            or not isinstance(known, list) or not all(isinstance(x, str) for x in known)):
        raise MalformedMessage(f"{ctx}: category feature {c.name!r} needs categories (and known) as lists of strings")
    if len(names) > MAX_CATEGORIES or len(known) > MAX_KNOWN:
        raise MalformedMessage(f"{ctx}: category feature {c.name!r} names {len(names)} categories and {len(known)} "
                               f"known ones, at most {MAX_CATEGORIES} and {MAX_KNOWN}")
    if len(c.freqs) != len(names) + 1:
        raise MalformedMessage(f"{ctx}: category feature {c.name!r} needs one share per category and one for "
                               f"'other' ({len(names) + 1}), got {len(c.freqs)}")


@dataclass(frozen=True)
class Reference:
    """The training reference captured at publish: per-feature bins and the output distribution.

    ``features`` are the columns of a 2-D table input. ``tensors`` describe an N-D input (images,
    audio frames): each is a :class:`FeatureReference` whose ``extra`` says what it measures
    (``stat``: a channel's values, or each sample's mean, std or share of saturated values; see
    :func:`agent.contract.histograms.tensor_stat`), with bins like any feature, so the hub scores both
    the same way. An agent from before tensors ignores the key (no histograms, no false alarms).

    ``categories`` describe string (categorical) columns: each a :class:`FeatureReference` whose
    ``extra["categories"]`` names its top training categories, bin ``i`` for category ``i`` and one
    last bin, "other", for every other training category (``extra["known"]`` lists those, up to
    :data:`MAX_KNOWN`). ``edges`` are the bin indices ``0..k+1``. A device counts a value in no
    bin at all, ``above``, when training never saw it (an unseen category), and names the most
    frequent unseen values in its histogram's ``unseen`` (see
    :func:`agent.contract.histograms.category_histogram`).

    The first output's float statistics (``confidence``/``value``) are tensor features with
    ``extra["output"]`` true. Those of the outputs after it (a classifier's probabilities after its
    labels) are in ``more_outputs``, each with ``extra["output"]`` the output's name: a key agents
    from before several outputs ignore, rather than fold the first output in their place."""

    features: tuple[FeatureReference, ...]
    rows: int = 0
    output: Mapping[str, Any] | None = None
    tensors: tuple[FeatureReference, ...] = ()
    categories: tuple[FeatureReference, ...] = ()
    more_outputs: tuple[FeatureReference, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset({"features", "rows", "output", "tensors", "categories",
                                                  "more_outputs"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ctx: str = "reference") -> Self:
        tensors = tuple(_list(d, "tensors", ctx, FeatureReference.from_dict)) if "tensors" in d else ()
        for t in tensors:
            stat = t.extra.get("stat")
            if stat not in TENSOR_STATS:
                raise MalformedMessage(f"{ctx}: tensor feature {t.name!r} needs stat in {TENSOR_STATS}, got {stat!r}")
            if stat == "channel" and not isinstance(t.extra.get("channel"), int):
                raise MalformedMessage(f"{ctx}: tensor feature {t.name!r} (a channel) needs an integer channel")
        categories = tuple(_list(d, "categories", ctx, FeatureReference.from_dict)) if "categories" in d else ()
        for c in categories:
            _check_categories(c, ctx)
        more = tuple(_list(d, "more_outputs", ctx, FeatureReference.from_dict)) if "more_outputs" in d else ()
        for t in more:
            if t.extra.get("stat") not in ("confidence", "value") or not isinstance(t.extra.get("output"), str):
                raise MalformedMessage(f"{ctx}: output feature {t.name!r} needs stat 'confidence' or 'value' and "
                                       f"the output's name in 'output', got {t.extra.get('stat')!r}, "
                                       f"{t.extra.get('output')!r}")
        return cls(
            features=tuple(_list(d, "features", ctx, FeatureReference.from_dict)),
            rows=_int(d, "rows", ctx) if "rows" in d else 0,
            output=_opt(d, "output", dict, ctx),
            tensors=tensors,
            categories=categories,
            more_outputs=more,
            extra=_extra(d, cls._known),
        )

    @property
    def first_input(self) -> str:
        """The input that features without an ``input`` of their own describe (the model's first:
        references from before several inputs name none). Stored as ``extra["first_input"]``."""
        return str(self.extra.get("first_input", ""))

    @property
    def all_features(self) -> tuple[FeatureReference, ...]:
        """Table columns, tensor and category features: everything the drift monitor scores."""
        return self.features + self.tensors + self.categories + self.more_outputs

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "features": [f.to_dict() for f in self.features],
            "rows": self.rows,
        }
        if self.tensors:
            out["tensors"] = [t.to_dict() for t in self.tensors]
        if self.categories:
            out["categories"] = [c.to_dict() for c in self.categories]
        if self.more_outputs:
            out["more_outputs"] = [c.to_dict() for c in self.more_outputs]
        if self.output is not None:
            out["output"] = dict(self.output)
        return out


@dataclass(frozen=True)
class ModelEntry:
    """One model in a desired state: what to run and everything needed to fetch and check it."""

    version: str
    sha256: str
    size: int
    url: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    reference: Reference | None = None
    canary: Mapping[str, Any] | None = None
    preflight: Mapping[str, Any] | None = None
    fallback: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset(
        {
            "version", "sha256", "size", "url", "inputs", "outputs",
            "reference", "canary", "preflight", "fallback",
        }
    )  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ctx: str = "model") -> Self:
        ref = _opt(d, "reference", dict, ctx)
        return cls(
            version=_get(d, "version", str, ctx),
            sha256=_get(d, "sha256", str, ctx),
            size=_int(d, "size", ctx),
            url=_get(d, "url", str, ctx),
            inputs=tuple(_list(d, "inputs", ctx, TensorSpec.from_dict)) if "inputs" in d else (),
            outputs=tuple(_list(d, "outputs", ctx, TensorSpec.from_dict))
            if "outputs" in d
            else (),
            reference=Reference.from_dict(ref, f"{ctx}.reference") if ref is not None else None,
            canary=_opt(d, "canary", dict, ctx),
            preflight=_opt(d, "preflight", dict, ctx),
            fallback=_opt(d, "fallback", str, ctx),
            extra=_extra(d, cls._known),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "url": self.url,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.reference is not None:
            out["reference"] = self.reference.to_dict()
        for key in ("canary", "preflight"):
            value = getattr(self, key)
            if value is not None:
                out[key] = dict(value)
        if self.fallback is not None:
            out["fallback"] = self.fallback
        return out


# --- message kinds ------------------------------------------------------------------------------


class _Message:
    """Shared ``from_dict``/``to_dict`` plumbing: subclasses define ``KIND`` and two hooks."""

    KIND: ClassVar[str]
    extra: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, **self._fields(), "kind": self.KIND}

    def _fields(self) -> dict[str, Any]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())


@dataclass(frozen=True)
class KeyEntry:
    keyid: str
    public: str  # base64 of the raw 32-byte Ed25519 public key
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset({"keyid", "public"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ctx: str = "key") -> Self:
        return cls(
            keyid=_get(d, "keyid", str, ctx),
            public=_get(d, "public", str, ctx),
            extra=_extra(d, cls._known),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "keyid": self.keyid, "public": self.public}


@dataclass(frozen=True)
class Keyring(_Message):
    """The root-signed list of keys that may sign desired states for a fleet.

    ``expires_at`` (optional): after it a device refuses this keyring when it arrives, and
    reports the one it trusts as stale (:mod:`agent.core.trust`). Keyrings signed before
    keyrings had an expiry carry none and never expire."""

    KIND: ClassVar[str] = "edgefleet.keyring/v1"
    fleet: str
    version: int
    keys: tuple[KeyEntry, ...]
    threshold: int = 1
    issued_at: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    expires_at: float | None = None

    _known: ClassVar[frozenset[str]] = frozenset(
        {"kind", "fleet", "version", "keys", "threshold", "issued_at", "expires_at"}
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        _check_kind(d, cls.KIND)
        ctx = "keyring"
        issued = parse_time(d["issued_at"], "keyring.issued_at") if "issued_at" in d else 0.0
        expires = parse_time(d["expires_at"], "keyring.expires_at") if d.get("expires_at") is not None else None
        if expires is not None and expires <= issued:
            raise MalformedMessage(
                f"keyring expires_at {format_time(expires)} is not after its issued_at {format_time(issued)}"
            )
        return cls(
            fleet=check_name(_get(d, "fleet", str, ctx), "fleet"),
            version=_int(d, "version", ctx, minimum=1),
            keys=tuple(_list(d, "keys", ctx, KeyEntry.from_dict)),
            threshold=_int(d, "threshold", ctx, minimum=1),
            issued_at=issued,
            extra=_extra(d, cls._known),
            expires_at=expires,
        )

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fleet": self.fleet,
            "version": self.version,
            "keys": [k.to_dict() for k in self.keys],
            "threshold": self.threshold,
            "issued_at": format_time(self.issued_at),
        }
        if self.expires_at is not None:  # absent in keyrings from before expiry: same bytes as then
            out["expires_at"] = format_time(self.expires_at)
        return out


@dataclass(frozen=True)
class DesiredState(_Message):
    """What one device should run, signed by the hub. ``seq`` grows strictly per device."""

    KIND: ClassVar[str] = "edgefleet.desired/v1"
    fleet: str
    device: str
    seq: int
    issued_at: float
    expires_at: float
    models: Mapping[str, ModelEntry]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset(
        {"kind", "fleet", "device", "seq", "issued_at", "expires_at", "models"}
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        _check_kind(d, cls.KIND)
        ctx = "desired"
        return cls(
            fleet=check_name(_get(d, "fleet", str, ctx), "fleet"),
            device=check_name(_get(d, "device", str, ctx), "device"),
            seq=_int(d, "seq", ctx, minimum=1),
            issued_at=parse_time(_get(d, "issued_at", str, ctx), "desired.issued_at"),
            expires_at=parse_time(_get(d, "expires_at", str, ctx), "desired.expires_at"),
            models=_map(d, "models", ctx, ModelEntry.from_dict),
            extra=_extra(d, cls._known),
        )

    def _fields(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "device": self.device,
            "seq": self.seq,
            "issued_at": format_time(self.issued_at),
            "expires_at": format_time(self.expires_at),
            "models": {name: m.to_dict() for name, m in self.models.items()},
        }


@dataclass(frozen=True)
class ModelReport:
    """What the device runs for one model, as it reports it."""

    version: str
    sha256: str
    state: str
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset({"version", "sha256", "state"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ctx: str = "model") -> Self:
        return cls(
            version=_get(d, "version", str, ctx),
            sha256=_get(d, "sha256", str, ctx),
            state=_get(d, "state", str, ctx),
            extra=_extra(d, cls._known),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "version": self.version, "sha256": self.sha256, "state": self.state}


@dataclass(frozen=True)
class Reported(_Message):
    """The device's retained account of itself: last applied ``seq`` and per-model state."""

    KIND: ClassVar[str] = "edgefleet.reported/v1"
    fleet: str
    device: str
    seq: int
    time: float
    models: Mapping[str, ModelReport]
    agent_version: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset(
        {"kind", "fleet", "device", "seq", "time", "models", "agent_version"}
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        _check_kind(d, cls.KIND)
        ctx = "reported"
        return cls(
            fleet=check_name(_get(d, "fleet", str, ctx), "fleet"),
            device=check_name(_get(d, "device", str, ctx), "device"),
            seq=_int(d, "seq", ctx),
            time=parse_time(_get(d, "time", str, ctx), "reported.time"),
            models=_map(d, "models", ctx, ModelReport.from_dict),
            agent_version=_opt(d, "agent_version", str, ctx) or "",
            extra=_extra(d, cls._known),
        )

    def _fields(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "device": self.device,
            "seq": self.seq,
            "time": format_time(self.time),
            "models": {name: m.to_dict() for name, m in self.models.items()},
            "agent_version": self.agent_version,
        }


@dataclass(frozen=True)
class ModelWindow:
    """One model version's share of a telemetry window.

    ``latency_ms`` holds ``p50``, ``p95``, ``p99``, ``max`` and ``buckets`` (upper bounds in ms)
    with ``counts`` (one more than buckets: the last counts everything above). ``inputs`` has one
    entry per reference feature: ``counts`` on the reference bins plus ``below``, ``above`` and
    ``nan``. ``canary`` (optional) is the candidate running beside this stable: see
    :meth:`agent.core.canary.CanaryStats.window` for its fields.
    """

    version: str
    requests: int
    errors: int
    rows: int
    latency_ms: Mapping[str, Any]
    inputs: tuple[Mapping[str, Any], ...] = ()
    outputs: Mapping[str, Any] | None = None
    canary: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset(
        {"version", "requests", "errors", "rows", "latency_ms", "inputs", "outputs", "canary"}
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ctx: str = "model") -> Self:
        inputs = _get(d, "inputs", list, ctx) if "inputs" in d else []
        if not all(isinstance(x, dict) for x in inputs):
            raise MalformedMessage(f"{ctx}: every entry of 'inputs' must be an object")
        return cls(
            version=_get(d, "version", str, ctx),
            requests=_int(d, "requests", ctx),
            errors=_int(d, "errors", ctx),
            rows=_int(d, "rows", ctx) if "rows" in d else 0,
            latency_ms=_get(d, "latency_ms", dict, ctx),
            inputs=tuple(inputs),
            outputs=_opt(d, "outputs", dict, ctx),
            canary=_opt(d, "canary", dict, ctx),
            extra=_extra(d, cls._known),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "rows": self.rows,
            "latency_ms": dict(self.latency_ms),
            "inputs": [dict(x) for x in self.inputs],
        }
        if self.outputs is not None:
            out["outputs"] = dict(self.outputs)
        if self.canary is not None:
            out["canary"] = dict(self.canary)
        return out


@dataclass(frozen=True)
class TelemetryWindow(_Message):
    """One window report. ``seq`` numbers windows per device so the hub can drop duplicates."""

    KIND: ClassVar[str] = "edgefleet.telemetry/v1"
    fleet: str
    device: str
    seq: int
    window_start: float
    window_end: float
    models: Mapping[str, ModelWindow]
    system: Mapping[str, float] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    agent_version: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset(
        {
            "kind", "fleet", "device", "seq", "window_start", "window_end", "models",
            "system", "metrics", "agent_version",
        }
    )  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        _check_kind(d, cls.KIND)
        ctx = "telemetry"
        return cls(
            fleet=check_name(_get(d, "fleet", str, ctx), "fleet"),
            device=check_name(_get(d, "device", str, ctx), "device"),
            seq=_int(d, "seq", ctx, minimum=1),
            window_start=parse_time(_get(d, "window_start", str, ctx), "window_start"),
            window_end=parse_time(_get(d, "window_end", str, ctx), "window_end"),
            models=_map(d, "models", ctx, ModelWindow.from_dict),
            system=_get(d, "system", dict, ctx) if "system" in d else {},
            metrics=_get(d, "metrics", dict, ctx) if "metrics" in d else {},
            agent_version=_opt(d, "agent_version", str, ctx) or "",
            extra=_extra(d, cls._known),
        )

    def _fields(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "device": self.device,
            "seq": self.seq,
            "window_start": format_time(self.window_start),
            "window_end": format_time(self.window_end),
            "models": {name: m.to_dict() for name, m in self.models.items()},
            "system": dict(self.system),
            "metrics": dict(self.metrics),
            "agent_version": self.agent_version,
        }


@dataclass(frozen=True)
class TelemetryAck(_Message):
    """The hub's answer to telemetry: these ``seqs`` of this device are stored (or were already).

    The broker's PUBACK only says the broker has a window; a broker or hub that dies before the
    window reaches the hub's database would lose it. An agent that has seen one ``TelemetryAck``
    keeps each window in its spool until the hub names it here (and re-sends it until then); the
    hub answers duplicates too, so a lost ack only costs a re-send. Written by the hub alone (the
    broker's ACL gives devices read access to their own ``acked`` topic), QoS 1, not retained.
    """

    KIND: ClassVar[str] = "edgefleet.telemetry_ack/v1"
    MAX_SEQS: ClassVar[int] = 10_000
    fleet: str
    device: str
    seqs: tuple[int, ...]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset({"kind", "fleet", "device", "seqs"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        _check_kind(d, cls.KIND)
        seqs = _get(d, "seqs", list, "telemetry_ack")
        if len(seqs) > cls.MAX_SEQS or not all(type(s) is int and s >= 1 for s in seqs):
            raise MalformedMessage(
                f"telemetry_ack.seqs must be a list of at most {cls.MAX_SEQS} positive integers, "
                f"got {len(seqs)} item(s) starting {seqs[:3]!r}"
            )
        return cls(
            fleet=check_name(_get(d, "fleet", str, "telemetry_ack"), "fleet"),
            device=check_name(_get(d, "device", str, "telemetry_ack"), "device"),
            seqs=tuple(seqs),
            extra=_extra(d, cls._known),
        )

    def _fields(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "device": self.device, "seqs": list(self.seqs)}


@dataclass(frozen=True)
class Event(_Message):
    """Something the operator should know: an update, a refusal, a rollback, an error."""

    KIND: ClassVar[str] = "edgefleet.event/v1"
    fleet: str
    device: str
    time: float
    type: str
    reason: str = ""
    message: str = ""
    model: str | None = None
    version: str | None = None
    seq: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _known: ClassVar[frozenset[str]] = frozenset(
        {"kind", "fleet", "device", "time", "type", "reason", "message", "model", "version", "seq"}
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        _check_kind(d, cls.KIND)
        ctx = "event"
        seq = _opt(d, "seq", int, ctx)
        return cls(
            fleet=check_name(_get(d, "fleet", str, ctx), "fleet"),
            device=check_name(_get(d, "device", str, ctx), "device"),
            time=parse_time(_get(d, "time", str, ctx), "event.time"),
            type=_get(d, "type", str, ctx),
            reason=_opt(d, "reason", str, ctx) or "",
            message=_opt(d, "message", str, ctx) or "",
            model=_opt(d, "model", str, ctx),
            version=_opt(d, "version", str, ctx),
            seq=seq,
            extra=_extra(d, cls._known),
        )

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fleet": self.fleet,
            "device": self.device,
            "time": format_time(self.time),
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
        }
        for key in ("model", "version", "seq"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class Status(_Message):
    """Retained liveness: ``online`` when connected; the Last Will says ``offline``."""

    KIND: ClassVar[str] = "edgefleet.status/v1"
    fleet: str
    device: str
    state: str
    time: float | None = None
    agent_version: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    STATES: ClassVar[frozenset[str]] = frozenset({"online", "offline"})
    _known: ClassVar[frozenset[str]] = frozenset(
        {"kind", "fleet", "device", "state", "time", "agent_version"}
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        _check_kind(d, cls.KIND)
        ctx = "status"
        state = _get(d, "state", str, ctx)
        if state not in cls.STATES:
            raise MalformedMessage(f"status.state must be online or offline, got {state!r}")
        t = _opt(d, "time", str, ctx)
        return cls(
            fleet=check_name(_get(d, "fleet", str, ctx), "fleet"),
            device=check_name(_get(d, "device", str, ctx), "device"),
            state=state,
            time=parse_time(t, "status.time") if t is not None else None,
            agent_version=_opt(d, "agent_version", str, ctx) or "",
            extra=_extra(d, cls._known),
        )

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fleet": self.fleet,
            "device": self.device,
            "state": self.state,
            "agent_version": self.agent_version,
        }
        if self.time is not None:
            out["time"] = format_time(self.time)
        return out


KINDS: dict[str, Any] = {
    cls.KIND: cls for cls in (Keyring, DesiredState, Reported, TelemetryWindow, TelemetryAck, Event, Status)
}


def parse_message(data: bytes | str) -> Any:
    """Parse any unsigned message by its ``kind``; raise MalformedMessage if it is unknown."""
    obj = parse_json_object(data)
    cls = KINDS.get(obj.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise MalformedMessage(
            f"unknown kind {obj.get('kind')!r}; expected one of {sorted(KINDS)}",
            reason="wrong_kind",
        )
    return cls.from_dict(obj)


# --- topics -------------------------------------------------------------------------------------

# Hub to device: desired, acked; device to hub: the rest.
CHANNELS = ("desired", "acked", "reported", "telemetry", "events", "status")


@dataclass(frozen=True)
class Topics:
    """Topic names under ``edgefleet/v1/{fleet}/`` (the root may be changed for tests)."""

    fleet: str
    prefix: str = TOPIC_PREFIX

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")

    @property
    def root(self) -> str:
        return f"{self.prefix}{self.fleet}/"

    def device(self, device: str, channel: str) -> str:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {CHANNELS}")
        return f"{self.root}devices/{check_name(device, 'device')}/{channel}"

    def desired(self, device: str) -> str:
        return self.device(device, "desired")

    @property
    def keyring(self) -> str:
        return f"{self.root}keyring"

    @property
    def roots(self) -> str:
        """Retained ``edgefleet.roots/v1`` chain of root rotations (see :mod:`agent.core.trust`)."""
        return f"{self.root}roots"

    @property
    def alerts(self) -> str:
        return f"{self.root}hub/alerts"

    def all_devices(self, channel: str) -> str:
        """Subscription filter for one channel of every device (``.../devices/+/telemetry``)."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {CHANNELS}")
        return f"{self.root}devices/+/{channel}"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """``(device, channel)`` for a device topic under this root, else ``None``."""
        if not topic.startswith(self.root + "devices/"):
            return None
        rest = topic[len(self.root) + len("devices/") :].split("/")
        if len(rest) != 2 or rest[1] not in CHANNELS or not NAME_RE.fullmatch(rest[0]):
            return None
        return rest[0], rest[1]
