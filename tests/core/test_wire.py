"""The wire contract survives a round trip: every kind, unknown fields at every level, canonical
JSON, names, topics, and ``from_dict`` errors that name the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.wire import (
    KINDS,
    DesiredState,
    Event,
    FeatureReference,
    KeyEntry,
    Keyring,
    ModelEntry,
    ModelReport,
    ModelWindow,
    Reference,
    Reported,
    Status,
    TelemetryAck,
    TelemetryWindow,
    TensorSpec,
    Topics,
    canonical_json,
    check_name,
    parse_message,
)

T0 = 1_800_000_000.123  # millisecond precision: the wire carries RFC 3339 with milliseconds
SHA = "0123456789abcdef" * 4
FUTURE = {"added_in": "v2", "nested": {"a": [1, 2.5, None, True]}}


def _model_entry() -> ModelEntry:
    return ModelEntry(
        version="2.1.0",
        sha256=SHA,
        size=123_456,
        url="https://blobs.example/sha256/" + SHA,
        inputs=(
            TensorSpec(name="x", dtype="float32", shape=(None, 4), extra={"doc": "sensor row"}),
        ),
        outputs=(TensorSpec(name="y", dtype="int64", shape=("batch",)),),
        reference=Reference(
            features=(
                FeatureReference(
                    name="temp", edges=(0.0, 1.5, 3.0), freqs=(0.25, 0.75), extra={"unit": "°C"}
                ),
            ),
            rows=500,
            output={"edges": [0, 1, 2], "freqs": [0.5, 0.5]},
            extra={"sample_digest": SHA},
        ),
        canary={"mode": "shadow", "sample": 0.1, "min_requests": 50},
        preflight={"url": "https://blobs.example/pre", "sha256": SHA, "size": 10},
        fallback="2.0.0",
        extra={"future_model_field": {"x": 1}},
    )


def _keyring() -> Keyring:
    return Keyring(
        fleet="fleet-a",
        version=3,
        keys=(KeyEntry(keyid="a" * 64, public="AAAA", extra={"label": "hub-1"}),),
        threshold=1,
        issued_at=T0,
        extra={"revoked": ["b" * 64]},
    )


def _desired() -> DesiredState:
    return DesiredState(
        fleet="fleet-a",
        device="dev-1",
        seq=42,
        issued_at=T0,
        expires_at=T0 + 3600,
        models={"classifier": _model_entry()},
    )


def _reported() -> Reported:
    return Reported(
        fleet="fleet-a",
        device="dev-1",
        seq=42,
        time=T0,
        models={"classifier": ModelReport(version="2.1.0", sha256=SHA, state="serving",
                                          extra={"since": "x"})},
        agent_version="0.1.0",
    )


def _telemetry() -> TelemetryWindow:
    return TelemetryWindow(
        fleet="fleet-a",
        device="dev-1",
        seq=7,
        window_start=T0,
        window_end=T0 + 10,
        models={
            "classifier": ModelWindow(
                version="2.1.0",
                requests=100,
                errors=1,
                rows=250,
                latency_ms={"p50": 1.5, "p95": 3.0, "p99": 4.5, "max": 9.0,
                            "buckets": [1, 5, 10], "counts": [40, 55, 4, 1]},
                inputs=({"name": "temp", "counts": [10, 90], "below": 0, "above": 0, "nan": 0},),
                outputs={"counts": [60, 40]},
                canary={"rollout": "r-1", "mode": "shadow", "version": "2.2.0", "state": "running",
                        "reason": None, "requests": 12, "errors": 0, "skipped": 1, "compared": 11,
                        "agreed": 10, "output_distance_sum": 0.75,
                        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 2.5, "max": 3.0},
                        "stable_latency_ms": {"p50": 0.9, "p95": 1.8, "p99": 2.0, "max": 2.1}},
                extra={"future_window_field": {"agreement": 0.99}},
            )
        },
        system={"cpu_percent": 12.5, "rss_mb": 80.0},
        metrics={"spool_dropped": 0.0},
        agent_version="0.1.0",
    )


def _event() -> Event:
    return Event(
        fleet="fleet-a",
        device="dev-1",
        time=T0,
        type="refused",
        reason="stale_seq",
        message="desired seq 3 is not above 42",
        model="classifier",
        version="2.1.0",
        seq=3,
    )


def _ack() -> TelemetryAck:
    return TelemetryAck(fleet="fleet-a", device="dev-1", seqs=(3, 1, 2))


def _status() -> Status:
    return Status(fleet="fleet-a", device="dev-1", state="online", time=T0, agent_version="0.1.0")


BUILDERS: dict[str, Callable[[], Any]] = {
    Keyring.KIND: _keyring,
    DesiredState.KIND: _desired,
    Reported.KIND: _reported,
    TelemetryWindow.KIND: _telemetry,
    Event.KIND: _event,
    Status.KIND: _status,
    TelemetryAck.KIND: _ack,
}


def test_every_kind_has_a_builder() -> None:
    assert set(BUILDERS) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_keeps_every_field_and_unknown_top_level_fields(kind: str) -> None:
    msg = BUILDERS[kind]()
    d = msg.to_dict()
    assert d["kind"] == kind
    d.update(FUTURE)  # a newer hub's fields this version does not know
    raw = canonical_json(d)

    back = parse_message(raw)

    assert type(back) is KINDS[kind]
    assert back == msg  # ``extra`` is compare=False, so check it through the bytes below
    assert back.extra == {**msg.extra, **FUTURE}
    assert canonical_json(back.to_dict()) == raw
    assert back.to_json() == raw


def test_unknown_fields_survive_in_model_entry_tensor_spec_and_feature_reference() -> None:
    d = _desired().to_dict()
    entry = d["models"]["classifier"]
    entry["signature_v2"] = {"opset": 17}
    entry["inputs"][0]["layout"] = "NCHW"
    entry["reference"]["features"][0]["quantiles"] = [0.1, 0.5, 0.9]
    raw = canonical_json(d)

    back = parse_message(raw)

    m = back.models["classifier"]
    assert m.extra == {"future_model_field": {"x": 1}, "signature_v2": {"opset": 17}}
    assert m.inputs[0].extra == {"doc": "sensor row", "layout": "NCHW"}
    assert m.reference.features[0].extra == {"unit": "°C", "quantiles": [0.1, 0.5, 0.9]}
    assert m.reference.extra == {"sample_digest": SHA}
    assert back.to_json() == raw


def test_unknown_fields_cannot_override_known_ones() -> None:
    """``to_dict`` writes extras first, so a stray extra never shadows a real field."""
    e = ModelEntry(version="1", sha256=SHA, size=1, url="https://x", extra={"size": 999})
    assert e.to_dict()["size"] == 1


# --- canonical JSON ---------------------------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_level_without_whitespace() -> None:
    out = canonical_json({"b": 1, "a": {"z": [1, {"y": 2, "x": 3}], "c": "d e"}})
    assert out == b'{"a":{"c":"d e","z":[1,{"x":3,"y":2}]},"b":1}'


def test_canonical_json_is_utf8_and_keeps_non_ascii() -> None:
    out = canonical_json({"name": "température ✓ 模型"})
    assert out == '{"name":"température ✓ 模型"}'.encode()
    assert b"\\u" not in out


def test_canonical_json_is_independent_of_insertion_order() -> None:
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_canonical_json_refuses_nan_and_infinity(bad: float) -> None:
    with pytest.raises(MalformedMessage):
        canonical_json({"x": [1.0, bad]})


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_parse_refuses_non_json_number_literals(literal: str) -> None:
    """What canonical_json cannot write, the parser does not accept either."""
    d = _status().to_dict()
    raw = canonical_json(d).replace(b'"state"', b'"load":' + literal.encode() + b',"state"')
    with pytest.raises(MalformedMessage):
        parse_message(raw)


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["+", "#", "dev/1", "a+b", "a#", "", "x" * 65, "dev 1", None, 7]
)
def test_check_name_refuses_wildcards_slashes_empty_and_long(bad: object) -> None:
    with pytest.raises(MalformedMessage) as info:
        check_name(bad, "device")
    assert info.value.reason == "bad_name"
    assert "device" in str(info.value)


@pytest.mark.parametrize("good", ["a", "dev-1", "Fleet_A.2", "x" * 64])
def test_check_name_accepts_valid_names(good: str) -> None:
    assert check_name(good) == good


# --- topics -------------------------------------------------------------------------------------


def test_topics_build() -> None:
    t = Topics("fleet-a")
    assert t.root == "edgefleet/v1/fleet-a/"
    assert t.desired("dev-1") == "edgefleet/v1/fleet-a/devices/dev-1/desired"
    assert t.device("dev-1", "telemetry") == "edgefleet/v1/fleet-a/devices/dev-1/telemetry"
    assert t.keyring == "edgefleet/v1/fleet-a/keyring"
    assert t.roots == "edgefleet/v1/fleet-a/roots"
    assert t.alerts == "edgefleet/v1/fleet-a/hub/alerts"
    assert t.all_devices("status") == "edgefleet/v1/fleet-a/devices/+/status"
    assert Topics("f", prefix="test/abc/").desired("d") == "test/abc/f/devices/d/desired"


def test_topics_build_refuses_bad_names_and_channels() -> None:
    with pytest.raises(MalformedMessage):
        Topics("fleet/a")
    with pytest.raises(MalformedMessage):
        Topics("fleet-a").desired("+")
    with pytest.raises(ValueError, match="unknown channel"):
        Topics("fleet-a").device("dev-1", "secrets")
    with pytest.raises(ValueError, match="unknown channel"):
        Topics("fleet-a").all_devices("secrets")


@pytest.mark.parametrize("channel", ["desired", "reported", "telemetry", "events", "status"])
def test_topics_parse_round_trips_every_channel(channel: str) -> None:
    t = Topics("fleet-a")
    assert t.parse(t.device("dev-1", channel)) == ("dev-1", channel)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v1/fleet-b/devices/dev-1/telemetry",  # another fleet
        "edgefleet/v1/fleet-a2/devices/dev-1/telemetry",  # a fleet whose name extends ours
        "edgefleet/v2/fleet-a/devices/dev-1/telemetry",  # another contract version
        "other/edgefleet/v1/fleet-a/devices/dev-1/telemetry",
        "edgefleet/v1/fleet-a/devices/+/telemetry",  # wildcard id
        "edgefleet/v1/fleet-a/devices/#",
        "edgefleet/v1/fleet-a/devices/dev-1/secrets",  # unknown channel
        "edgefleet/v1/fleet-a/devices/dev-1/telemetry/extra",
        "edgefleet/v1/fleet-a/devices//telemetry",
        "edgefleet/v1/fleet-a/keyring",
        "edgefleet/v1/fleet-a/hub/alerts",
    ],
)
def test_topics_parse_returns_none_for_foreign_topics(topic: str) -> None:
    assert Topics("fleet-a").parse(topic) is None


# --- from_dict errors ---------------------------------------------------------------------------


def _desired_dict() -> dict[str, Any]:
    return _desired().to_dict()


def test_seq_as_bool_is_refused_naming_the_field() -> None:
    d = _desired_dict()
    d["seq"] = True
    with pytest.raises(MalformedMessage, match=r"'seq' must not be a boolean"):
        DesiredState.from_dict(d)


def test_seq_as_string_is_refused_naming_the_field() -> None:
    d = _desired_dict()
    d["seq"] = "42"
    with pytest.raises(MalformedMessage, match=r"desired: field 'seq' must be int, got str"):
        DesiredState.from_dict(d)


def test_seq_below_one_is_refused() -> None:
    d = _desired_dict()
    d["seq"] = 0
    with pytest.raises(MalformedMessage, match=r"'seq' must be >= 1"):
        DesiredState.from_dict(d)


def test_missing_sha256_is_refused_naming_the_field_and_model() -> None:
    d = _desired_dict()
    del d["models"]["classifier"]["sha256"]
    with pytest.raises(MalformedMessage) as info:
        parse_message(canonical_json(d))
    assert info.value.reason == "missing_field"
    assert "'sha256' is missing" in str(info.value)
    assert "classifier" in str(info.value)


def test_size_as_float_is_refused() -> None:
    d = _desired_dict()
    d["models"]["classifier"]["size"] = 12.5
    with pytest.raises(MalformedMessage, match=r"'size' must be int"):
        DesiredState.from_dict(d)


def test_tensor_shape_entry_of_wrong_type_is_refused() -> None:
    with pytest.raises(MalformedMessage, match="shape"):
        TensorSpec.from_dict({"name": "x", "dtype": "float32", "shape": [1.5]})


def test_feature_reference_with_mismatched_bins_is_refused() -> None:
    with pytest.raises(MalformedMessage, match="len"):
        FeatureReference.from_dict({"name": "f", "edges": [0, 1], "freqs": [0.5, 0.5]})


def test_model_name_with_wildcard_is_refused() -> None:
    d = _desired_dict()
    d["models"]["a+b"] = d["models"].pop("classifier")
    with pytest.raises(MalformedMessage) as info:
        DesiredState.from_dict(d)
    assert info.value.reason == "bad_name"


def test_time_without_zone_is_refused() -> None:
    d = _desired_dict()
    d["expires_at"] = "2027-01-15T08:00:00"
    with pytest.raises(MalformedMessage, match="time zone"):
        DesiredState.from_dict(d)


def test_status_state_outside_online_offline_is_refused() -> None:
    d = _status().to_dict()
    d["state"] = "sleeping"
    with pytest.raises(MalformedMessage, match="online or offline"):
        parse_message(canonical_json(d))


def test_wrong_and_unknown_kind_are_refused() -> None:
    with pytest.raises(MalformedMessage) as info:
        DesiredState.from_dict(_status().to_dict())
    assert info.value.reason == "wrong_kind"
    with pytest.raises(MalformedMessage) as info:
        parse_message(b'{"kind":"edgefleet.desired/v9"}')
    assert info.value.reason == "wrong_kind"


@pytest.mark.parametrize("raw", [b"", b"[1,2]", b"\xff\xfe{", b"{", json.dumps("x").encode()])
def test_non_object_or_non_json_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_message(raw)


def test_model_window_canary_is_a_known_field_and_optional() -> None:
    win = _telemetry().models["classifier"]
    d = win.to_dict()
    assert d["canary"]["rollout"] == "r-1" and "canary" not in win.extra
    back = ModelWindow.from_dict(d)
    assert back.canary == win.canary and back.extra == win.extra
    plain = ModelWindow(version="1", requests=0, errors=0, rows=0, latency_ms={})
    assert "canary" not in plain.to_dict()
    assert ModelWindow.from_dict(plain.to_dict()).canary is None


def test_model_window_canary_of_wrong_type_is_refused() -> None:
    d = _telemetry().models["classifier"].to_dict()
    d["canary"] = [1, 2]
    with pytest.raises(MalformedMessage, match="canary"):
        ModelWindow.from_dict(d)


@pytest.mark.parametrize("seqs", [[0], [1.5], ["2"], [True], list(range(1, TelemetryAck.MAX_SEQS + 2))])
def test_telemetry_ack_refuses_what_is_not_a_bounded_list_of_positive_seqs(seqs: list[object]) -> None:
    d = {"kind": TelemetryAck.KIND, "fleet": "fleet-a", "device": "dev-1", "seqs": seqs}
    with pytest.raises(MalformedMessage, match="positive integers"):
        TelemetryAck.from_dict(d)
