"""Failover between broker nodes: the pure policy (seeded), then MqttLink between two real Mosquittos."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import pytest

from edgefleet.agent.adapters.mqttlink import MqttLink
from edgefleet.agent.contract.broker import parse_broker_urls
from edgefleet.agent.contract.config import load_agent_config
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.core.reconnect import Failover
from tests.conftest import Broker, wait_for


def test_failover_moves_to_the_next_node_and_grows_per_failed_round() -> None:
    f = Failover(3, base=1.0, cap=8.0, rng=random.Random(1))
    start = f.index
    ceilings = []
    for _ in range(12):
        idx, delay = f.failed()
        assert 0.1 <= delay <= f.ceiling()
        ceilings.append(f.ceiling())
        assert idx == f.index
    assert f.index == start  # twelve failures over three nodes: back where it began
    assert ceilings == [1.0] * 3 + [2.0] * 3 + [4.0] * 3 + [8.0] * 3  # doubles per round, capped
    f.connected()
    assert f.ceiling() == 1.0


def test_a_fleet_starts_spread_over_the_nodes_and_reconnects_spread_in_time() -> None:
    rng = random.Random(7)
    fleet = [Failover(3, rng=rng) for _ in range(3000)]
    counts = [sum(f.index == i for f in fleet) for i in range(3)]
    assert min(counts) > 900, counts  # ~1000 each, not all on the first URL
    waits = [f.failed()[1] for f in fleet]  # the node they were on dies: when does each come back?
    per_tenth = [sum(int(w * 10) == k for w in waits) for k in range(1, 10)]
    assert max(per_tenth) < 2 * statistics.mean(per_tenth), per_tenth  # no herd in one instant
    assert max(waits) <= 1.0


def test_bad_failover_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one broker"):
        Failover(0)
    with pytest.raises(ValueError, match="floor <= base <= cap"):
        Failover(2, base=5.0, cap=1.0)


def test_broker_url_lists() -> None:
    a = parse_broker_urls("mqtts://n1:8883, mqtts://n2:8884")
    assert [(x.host, x.port, x.tls) for x in a] == [("n1", 8883, True), ("n2", 8884, True)]
    assert parse_broker_urls(["mqtt://a"])[0].port == 1883
    with pytest.raises(ValueError, match="must all be mqtt:// or all mqtts://"):
        parse_broker_urls("mqtt://a,mqtts://b")
    with pytest.raises(ValueError, match="separated by commas"):
        parse_broker_urls("mqtt://a,,mqtt://b")


def _agent_toml(tmp_path: Path, broker: str) -> Path:
    (tmp_path / "p.toml").write_text((Path(__file__).parents[2] / "device-profiles" / "generic-x86_64.toml").read_text())
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'fleet = "f"\ndevice = "d1"\nbroker_url = {broker}\nblob_url = "http://h:1"\n'
                   'root_public_key = "x"\nprofile = "p.toml"\n')
    return cfg


def test_agent_config_takes_a_list_of_broker_urls(tmp_path: Path) -> None:
    cfg = load_agent_config(_agent_toml(tmp_path, '["mqtt://n1:1883", "mqtt://n2:1884"]'))
    assert cfg.broker_url == "mqtt://n1:1883,mqtt://n2:1884"
    with pytest.raises(ConfigError, match="broker URL must look like"):
        load_agent_config(_agent_toml(tmp_path, '["mqtt://n1", "http://n2"]'))
    with pytest.raises(ConfigError, match="a list of them"):
        load_agent_config(_agent_toml(tmp_path, "42"))


def test_mqtt_link_fails_over_to_the_live_node_and_back(tmp_path: Path) -> None:
    nodes = []
    for i in range(2):
        (tmp_path / f"n{i}").mkdir()
        b = Broker(tmp_path / f"n{i}")
        b.start()
        nodes.append(b)
    got: list[bytes] = []
    link = MqttLink(url=",".join(b.url for b in nodes), client_id="fo", subscriptions=[("t", 1)],
                    on_message=lambda _t, p, _r: got.append(p), rng=random.Random(3))
    link.start()
    try:
        assert link.connected.wait(10)
        first = next(b for b in nodes if b.port == link.address.port)
        other = next(b for b in nodes if b is not first)
        assert first.proc is not None
        first.proc.kill()  # SIGKILL: no goodbye from the node
        t0 = time.monotonic()
        wait_for(lambda: link.connected.is_set() and link.address.port == other.port, 15, "failover")
        assert time.monotonic() - t0 < 5  # one jittered wait of at most 1 s, not paho's backoff
        link.publish("t", b"after", qos=1)
        wait_for(lambda: b"after" in got, 5, "a message through the surviving node")
        first.start()  # the dead node comes back; the survivor dies: the link goes back
        assert other.proc is not None
        other.proc.kill()
        wait_for(lambda: link.connected.is_set() and link.address.port == first.port, 15, "failback")
    finally:
        link.stop()
        for b in nodes:
            b.stop()
