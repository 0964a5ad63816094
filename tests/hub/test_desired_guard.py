"""The broker's retained desired state never stays older than the hub's: the hub reads the desired
topics back and publishes the stored state again over any older copy the broker takes (a paho
re-send of an unacknowledged publish after a reconnect, a broker restoring an old retained copy).
A real hub, a real Mosquitto, a plain MQTT client standing in for the stale publisher."""

from __future__ import annotations

import base64
import json
import queue
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.contract.envelope import open_envelope
from edgefleet.agent.contract.wire import Topics
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub, _desired_seq_of
from tests.conftest import Broker, wait_for
from tests.simulator import tiny_model

pytestmark = pytest.mark.broker


def _client(broker: Broker) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def _retained_seq(broker: Broker, topic: str) -> int:
    """The seq of the desired state a device connecting now would receive."""
    got: queue.Queue[bytes] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = lambda client, userdata, msg: got.put(bytes(msg.payload))
    c.on_connect = lambda client, userdata, flags, rc, props: client.subscribe(topic, 0)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        return _desired_seq_of(got.get(timeout=5))
    finally:
        c.disconnect()
        c.loop_stop()
        c.socket() is None or c.socket().close()  # type: ignore[union-attr]


def test_an_older_desired_state_the_broker_takes_is_replaced_by_the_stored_one(tmp_path: Path,
                                                                              broker: Broker) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url=broker.url, http_listen="127.0.0.1:0")
    hub = Hub(home)
    hub.start()
    try:
        hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(tiny_model(1.0)).decode()}, "admin")
        hub.publish({"name": "m", "version": "2", "model_b64": base64.b64encode(tiny_model(2.0)).decode()}, "admin")
        hub.add_device({"device": "d1"}, "admin")
        topic = Topics("f").desired("d1")
        hub.deploy({"model": "m", "version": "1", "devices": ["d1"]}, "admin")
        older = hub.db.desired_envelope("d1")
        hub.deploy({"model": "m", "version": "2", "devices": ["d1"]}, "admin")
        stored = hub.db.desired_seq("d1")
        assert older is not None and _desired_seq_of(older.encode()) < stored
        wait_for(lambda: _retained_seq(broker, topic) == stored, 10, "the newest state retained")

        # The stale publish: the older, validly signed state lands after its successor.
        stale = _client(broker)
        stale.publish(topic, older.encode(), qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: hub.stale_desired_fixed >= 1, 10, "the hub noticing the older copy")
        wait_for(lambda: _retained_seq(broker, topic) == stored, 10, "the newest state retained again")
        # A cleared retained copy is put back too.
        stale.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: hub.stale_desired_fixed >= 2, 10, "the hub noticing the cleared copy")
        wait_for(lambda: _retained_seq(broker, topic) == stored, 10, "the newest state retained again")
        # The hub's own publishes come back too, are compared, and change nothing.
        fixed, checked = hub.stale_desired_fixed, hub.desired_checked
        hub.publish_desired("d1")
        wait_for(lambda: hub.desired_checked > checked, 10, "the hub's own publish read back")
        assert hub.stale_desired_fixed == fixed
        stale.disconnect()
        stale.loop_stop()
    finally:
        hub.stop()


@pytest.mark.parametrize(("payload", "seq"), [
    (b"", 0),
    (b"not json", 0),
    (json.dumps({"payload": base64.b64encode(b'{"seq": 7}').decode(), "signatures": []}).encode(), 7),
    (json.dumps({"payload": base64.b64encode(b'{"seq": true}').decode(), "signatures": []}).encode(), 0),
    (json.dumps({"payload": base64.b64encode(b"[1]").decode(), "signatures": []}).encode(), 0),
])
def test_the_desired_seq_of_what_the_broker_holds(payload: bytes, seq: int) -> None:
    assert _desired_seq_of(payload) == seq
    if seq:
        assert open_envelope(payload).payload == b'{"seq": 7}'
