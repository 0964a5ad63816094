"""The packet-size limit of the generated broker configuration, on a real Mosquitto: the largest
payload hub and agents accept (MAX_MESSAGE_BYTES) goes through, a 30 MiB telemetry message from an
enrolled device is refused (the device is disconnected, nothing reaches the hub's subscription),
and normal traffic goes on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.contract.wire import MAX_MESSAGE_BYTES, Topics
from edgefleet.hub.adapters.brokerconf import MAX_PACKET_BYTES
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.pki import DevicePki
from tests._securebroker import GeneratedBroker, TlsClient, start_generated_broker
from tests.conftest import wait_for

pytestmark = [pytest.mark.broker]


@pytest.fixture
def broker(tmp_path: Path, fleet: str) -> Iterator[GeneratedBroker]:
    HubHome(tmp_path / "hub").init(fleet=fleet, broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    b = start_generated_broker(tmp_path / "hub", fleet, tmp_path)
    try:
        yield b
    except BaseException:
        print(b.logs())
        raise
    finally:
        b.stop()


def _device_cert(broker: GeneratedBroker, device: str) -> tuple[str, str]:
    issued = DevicePki(broker.home / "pki", broker.fleet).issue_client(device, time.time())
    cert, key = broker.folder.parent / f"{device}.pem", broker.folder.parent / f"{device}.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return str(cert), str(key)


def test_the_generated_config_caps_packets_just_above_the_largest_message(broker: GeneratedBroker) -> None:
    conf = (broker.folder / "mosquitto.conf").read_text().splitlines()
    assert f"max_packet_size {MAX_PACKET_BYTES}" in conf
    assert f"message_size_limit {MAX_MESSAGE_BYTES}" in conf
    assert MAX_MESSAGE_BYTES < MAX_PACKET_BYTES <= MAX_MESSAGE_BYTES + 65536


def test_an_oversized_publish_is_refused_and_normal_traffic_works(broker: GeneratedBroker) -> None:
    topics = Topics(broker.fleet)
    topic = topics.device("dev-1", "telemetry")
    cert = _device_cert(broker, "dev-1")
    hub = TlsClient(broker.ca, port=broker.hub_port, user=broker.hub_user, password=broker.hub_password,
                    client_id=f"{broker.hub_user}-probe")
    assert hub.connect() == "connected"
    hub.client.subscribe(topics.all_devices("telemetry"), 1)
    time.sleep(0.5)  # the SUBACK

    def publish(payload: bytes) -> TlsClient:
        dev = TlsClient(broker.ca, port=broker.device_port, cert=cert)
        assert dev.connect() == "connected"
        dev.client.publish(topic, payload, qos=1)
        return dev

    try:
        # The largest payload hub and agents accept still goes through.
        biggest = json.dumps({"pad": "x" * (MAX_MESSAGE_BYTES - 11)}).encode()
        assert len(biggest) == MAX_MESSAGE_BYTES
        dev = publish(biggest)
        wait_for(lambda: any(p == biggest for _, p in hub.received()), 20,
                 f"the hub to receive a {MAX_MESSAGE_BYTES}-byte message")
        dev.close()

        # 30 MiB: the broker disconnects the sender instead of buffering and forwarding it.
        huge = b"{" + b" " * (30 * 2**20) + b"}"
        dev = publish(huge)
        assert dev.disconnected.wait(20), "the broker kept a client that sent a 30 MiB packet"
        dev.close()

        # Normal traffic goes on, and the huge message never reached the hub.
        small = json.dumps({"window": 1}).encode()
        dev = publish(small)
        wait_for(lambda: any(p == small for _, p in hub.received()), 10, "a normal window at the hub")
        dev.close()
        time.sleep(0.5)
        sizes = [len(p) for _, p in hub.received()]
        assert sizes == [len(biggest), len(small)], sizes
        assert not hub.disconnected.is_set()
    finally:
        hub.close()


def test_the_generated_config_sets_no_connection_cap_and_ships_the_open_files_drop_in(broker: GeneratedBroker) -> None:
    conf = (broker.folder / "mosquitto.conf").read_text().splitlines()
    listeners = [i for i, line in enumerate(conf) if line.startswith("listener ")]
    assert len(listeners) == 3
    for i in listeners:  # per_listener_settings: each listener carries its own
        assert conf[i + 1] == "max_connections -1", conf[i:i + 3]
    drop_in = (broker.folder / "mosquitto-limits.conf").read_text()
    assert "[Service]\nLimitNOFILE=1048576\n" in drop_in and "mosquitto.service.d" in drop_in
