"""The telemetry spool on real files, and its in-flight bookkeeping (pure)."""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.adapters.spool import Outbox, Spool


def test_windows_survive_reopen_in_order_and_ack_removes_them(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", max_bytes=10_000)
    for seq in (3, 1, 2):
        assert s.put(seq, f"window {seq}".encode()) == []
    assert s.seqs() == [1, 2, 3]
    again = Spool(tmp_path / "spool", max_bytes=10_000)  # as after kill -9
    assert again.seqs() == [1, 2, 3]
    assert again.read(2) == b"window 2"
    again.remove(1)
    assert Spool(tmp_path / "spool", max_bytes=10_000).seqs() == [2, 3]


def test_full_spool_drops_oldest_not_in_flight_and_counts_persistently(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", max_bytes=250)
    for seq in range(1, 4):
        s.put(seq, b"x" * 100)
    assert s.seqs() == [2, 3]  # 300 bytes > 250: window 1 went
    assert s.dropped_total == 1
    dropped = s.put(4, b"x" * 100, keep={2})
    assert dropped == [3]
    assert s.seqs() == [2, 4]
    assert Spool(tmp_path / "spool", max_bytes=250).dropped_total == 2


def test_window_larger_than_the_spool_is_still_kept(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", max_bytes=10)
    s.put(1, b"y" * 50)
    assert s.seqs() == [1]


def test_leftover_temp_file_from_a_killed_write_is_ignored_and_cleaned(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    (d / ".00000000000000000007.json.123.tmp").write_bytes(b"{torn")
    s = Spool(d, max_bytes=1000)
    assert s.seqs() == []
    assert not any(d.glob(".*tmp"))


def test_outbox_limits_in_flight_resends_late_ones_and_maps_acks() -> None:
    box = Outbox(max_inflight=2, resend_after=30.0)
    assert box.due([1, 2, 3], now=0.0) == [1, 2]
    box.sent(1, mid=11, now=0.0)
    box.sent(2, mid=12, now=0.0)
    assert box.due([1, 2, 3], now=1.0) == []
    assert box.due(list(range(1, 100_000)), now=1.0) == []  # stops after the in-flight ones
    assert box.acked(11) == 1
    assert box.acked(99) is None
    assert box.due([2, 3], now=1.0) == [3]
    assert box.due([2, 3], now=31.0) == [2, 3]
    box.sent(2, mid=13, now=31.0)  # a resend: either ack settles it
    assert box.acked(12) == 2
    assert box.acked(13) is None
    assert box.in_flight() == set()
