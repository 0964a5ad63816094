"""agent.capture: sampling, the bounded on-disk spool, batched upload, and the hub's wire check.

Real files in tmp_path; the sender is a plain function (the hub's side is tested end to end in
test_traceability_e2e.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.adapters.capture import Capture, parse_batch
from edgefleet.agent.contract.errors import MalformedMessage, Refused, Unavailable

SHA = "ab" * 32


class Hub:
    """A fake upload target: records batches; ``down`` makes it unreachable, ``refuse`` a 4xx."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.down = False
        self.refuse = False

    def __call__(self, records: list[dict[str, Any]]) -> None:
        if self.down:
            raise Unavailable("hub down")
        if self.refuse:
            raise Refused("no")
        self.batches.append(records)


def make(tmp_path: Path, hub: Hub, rate: float = 1.0, budget: int = 1 << 20, batch: int = 200,
         seed: int = 0) -> Capture:
    return Capture(folder=tmp_path / "capture", sample_rate=rate, budget_bytes=budget, send=hub,
                   clock=lambda: 1000.0, batch_records=batch, rng=random.Random(seed))


def add(cap: Capture, i: int, rows: int = 1) -> None:
    x = np.full((rows, 3), i, dtype=np.float32)
    cap.add("clf", "1.0.0", SHA, f"r{i}", {"input": x}, {"label": np.array([i] * rows)})


def test_rate_zero_never_samples_and_rate_one_always_does(tmp_path: Path) -> None:
    assert not any(make(tmp_path, Hub(), rate=0.0).sample() for _ in range(1000))
    assert all(make(tmp_path, Hub(), rate=1.0).sample() for _ in range(1000))
    cap = make(tmp_path, Hub(), rate=0.1, seed=3)
    hits = sum(cap.sample() for _ in range(10000))
    assert 800 < hits < 1200


def test_records_are_copied_spooled_and_uploaded_in_batches(tmp_path: Path) -> None:
    hub = Hub()
    cap = make(tmp_path, hub, batch=3)
    x = np.zeros((1, 3), dtype=np.float32)
    cap.add("clf", "1.0.0", SHA, "r0", {"input": x}, {"label": np.array([1])})
    x[0, 0] = 99  # the caller reuses its buffer: the capture must hold the value it saw
    for i in range(1, 7):
        add(cap, i)
        if i % 2 == 0:
            cap.flush()  # three segments of 3, 2 and 2 records
    cap.flush()
    assert cap.upload() == 7
    assert [len(b) for b in hub.batches] == [3, 2, 2]  # whole segments, at most 3 records a batch
    first = hub.batches[0][0]
    assert first["request_id"] == "r0" and first["inputs"]["input"]["data"] == [0.0, 0.0, 0.0]
    assert first["outputs"]["label"] == {"dtype": "int64", "shape": [1], "data": [1]}
    assert cap.spool.segments() == []


def test_unreachable_hub_keeps_the_spool_and_a_later_round_sends_it(tmp_path: Path) -> None:
    hub = Hub()
    hub.down = True
    cap = make(tmp_path, hub)
    add(cap, 1)
    cap.run_once()
    assert hub.batches == [] and len(cap.spool.segments()) == 1
    # a restarted agent finds the spool on disk
    hub.down = False
    again = make(tmp_path, hub)
    again.run_once()
    assert [r["request_id"] for b in hub.batches for r in b] == ["r1"]


def test_refused_batch_is_dropped_and_counted_so_it_cannot_block_the_spool(tmp_path: Path) -> None:
    hub = Hub()
    hub.refuse = True
    cap = make(tmp_path, hub)
    add(cap, 1)
    cap.run_once()
    assert cap.counters["rejected"] == 1 and cap.spool.segments() == []


def test_spool_over_budget_drops_oldest_records_and_counts_them(tmp_path: Path) -> None:
    hub = Hub()
    hub.down = True
    cap = make(tmp_path, hub, budget=2000)
    for i in range(40):
        add(cap, i)
        cap.run_once()
    assert cap.spool.size() <= 2000
    assert cap.dropped() > 0
    hub.down = False
    cap.run_once()
    sent = [r["request_id"] for b in hub.batches for r in b]
    assert sent[-1] == "r39" and "r0" not in sent
    assert len(sent) + cap.dropped() == 40


def test_pending_records_over_budget_are_dropped_not_queued(tmp_path: Path) -> None:
    cap = make(tmp_path, Hub(), budget=4096)
    for i in range(10):
        add(cap, i, rows=100)  # 1.2 kB of float32 each plus labels
    assert cap.counters["sampled"] == 10
    assert cap.counters["dropped"] >= 7


def _batch(**rec: Any) -> dict[str, Any]:
    r = {"request_id": "r1", "time": 1.0, "model": "clf", "version": "1", "sha256": SHA,
         "inputs": {"input": {"dtype": "float32", "shape": [1], "data": [1.0]}}, "outputs": {}}
    r.update(rec)
    return {"kind": "edgefleet.capture/v1", "fleet": "f", "device": "d", "records": [r]}


def test_wire_check_accepts_a_good_batch() -> None:
    fleet, device, records = parse_batch(_batch())
    assert (fleet, device, records[0]["request_id"]) == ("f", "d", "r1")


@pytest.mark.parametrize("bad", [{"sha256": "xyz"}, {"time": "now"}, {"model": "a/b"}, {"request_id": ""},
                                 {"inputs": {"input": {"data": 1}}}, {"version": 3}])
def test_wire_check_refuses_a_malformed_record(bad: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage, match=r"records\[0\]"):
        parse_batch(_batch(**bad))


def test_wire_check_refuses_wrong_kind_and_empty_batch() -> None:
    with pytest.raises(MalformedMessage, match="kind"):
        parse_batch({**_batch(), "kind": "x"})
    with pytest.raises(MalformedMessage, match="records"):
        parse_batch({**_batch(), "records": []})


def test_profile_capture_section_defaults_off_and_checks_the_rate(tmp_path: Path) -> None:
    from edgefleet.agent.contract.config import load_profile
    from edgefleet.agent.contract.errors import ConfigError
    from tests.conftest import REPO

    generic = load_profile(REPO / "device-profiles" / "generic-x86_64.toml")
    assert generic.capture_sample_rate == 0.0
    on = load_profile(REPO / "device-profiles" / "generic-x86_64.toml",
                      {"capture": {"sample_rate": 0.25, "spool_kb": 64}})
    assert (on.capture_sample_rate, on.capture_spool_kb) == (0.25, 64)
    with pytest.raises(ConfigError, match="sample_rate must be a number from 0 to 1"):
        load_profile(REPO / "device-profiles" / "generic-x86_64.toml", {"capture": {"sample_rate": 1.5}})
