"""The NATS configuration builders and the names they map, without a server."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edgefleet.agent.contract.broker import client_id
from edgefleet.agent.contract.wire import Topics
from edgefleet.hub.adapters.jetstream import parse_nats_urls, stream_name
from edgefleet.hub.adapters.natsconf import NatsLayout, node_conf_text
from edgefleet.hub.core.brokeracl import subject_to_topic, topic_to_subject, user_dn, users_conf_text


@pytest.mark.parametrize("topic, subject", [
    ("edgefleet/v1/f/devices/dev1/telemetry", "edgefleet.v1.f.devices.dev1.telemetry"),
    ("edgefleet/v1/f.x/devices/a.b.c/desired", "edgefleet.v1.f//x.devices.a//b//c.desired"),
    ("edgefleet/v1/f/devices/*/status", "edgefleet.v1.f.devices.*.status"),
])
def test_topics_map_to_the_subjects_nats_uses_and_back(topic: str, subject: str) -> None:
    assert topic_to_subject(topic) == subject  # as NATS's MQTT layer maps them (seen on a server)
    assert subject_to_topic(subject) == topic


def test_certificate_subjects_are_written_as_nats_matches_them() -> None:
    assert user_dn("f", "dev-1") == "CN=dev-1,O=edgefleet f"
    assert user_dn("f", "hub@f") == "CN=hub@f,O=edgefleet f"
    assert user_dn("a,b", "x") == "CN=x,O=edgefleet a\\,b"  # RFC 4514 escapes


def test_client_ids_have_no_dot_and_never_collide() -> None:
    names = ["a.b", "a_b", "a_db", "a__b", "a-b", "ab", "a..b", "a._b"]
    ids = [client_id("agent", "f.1", n) for n in names]
    assert all("." not in i for i in ids)
    assert len(set(ids)) == len(names)
    for a, b in itertools.combinations(names, 2):
        assert client_id("agent", a) != client_id("agent", b)


def test_users_file_gives_each_device_its_own_channels_only() -> None:
    text = users_conf_text("f", ["d.1", "d2"], "hub@f")
    t = Topics("f")
    line = next(x for x in text.splitlines() if '"CN=d.1,' in x)
    for c in ("reported", "telemetry", "events", "status"):
        assert f'"edgefleet.v1.f.devices.d//1.{c}"' in line.split("subscribe")[0]
    for s in ("edgefleet.v1.f.devices.d//1.desired", "edgefleet.v1.f.devices.d//1.acked",
              topic_to_subject(t.keyring), topic_to_subject(t.roots)):
        assert f'"{s}"' in line.split("subscribe")[1]
    assert "d2" not in line and ">" not in line and "*" not in line
    assert 'user: "CN=hub@f,O=edgefleet f", permissions: { publish: ">", subscribe: ">" }' in text


def test_layout_ports_step_per_node_on_one_host_only(tmp_path: Path) -> None:
    one = NatsLayout(folder=tmp_path, nodes=3, hosts=("127.0.0.1",), mqtt_port=1000)
    assert one.urls("mqtt") == ["mqtts://127.0.0.1:1000", "mqtts://127.0.0.1:1001", "mqtts://127.0.0.1:1002"]
    three = NatsLayout(folder=tmp_path, nodes=3, hosts=("a", "b", "c"), client_port=4222)
    assert three.urls("nats") == ["tls://a:4222", "tls://b:4222", "tls://c:4222"]
    assert NatsLayout(folder=tmp_path, nodes=5).replicas() == 3
    conf = node_conf_text(three, "f", 1)
    assert 'server_name: "edgefleet-2"' in conf and '"nats-route://c:6222"' in conf
    with pytest.raises(ValueError, match="one host for all 3 nodes or one per node"):
        NatsLayout(folder=tmp_path, nodes=3, hosts=("a", "b"))
    with pytest.raises(ValueError, match="at least one node"):
        NatsLayout(folder=tmp_path, nodes=0)


def test_stream_names_and_nats_urls() -> None:
    assert stream_name("fleet.eu-1") == "EDGEFLEET_fleet_deu-1"
    assert stream_name("a.b") != stream_name("a_b")
    assert parse_nats_urls("tls://a:4222, tls://b:4223") == ["tls://a:4222", "tls://b:4223"]
    with pytest.raises(ValueError, match="nats://HOST:PORT or tls://HOST:PORT"):
        parse_nats_urls("mqtt://a:1883")
