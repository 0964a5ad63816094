"""hub.ingestlink: the hub's own MQTT 3.1.1 subscriber.

The packet codec is tested on bytes; the link against a real Mosquitto (persistent sessions,
backpressure, keepalive, a broker restart, a refused password).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.hub.adapters.ingestlink import IngestLink, ProtocolError, connect_packet, split_packets
from edgefleet.hub.adapters.pki import hash_password
from tests.conftest import Broker, mosquitto_bin, wait_for

# -- the codec ------------------------------------------------------------------------------------


def _publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", packet_id) + payload
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | 0x80 if n else digit)
        if not n:
            break
    return bytes([0x32]) + bytes(length) + body


def test_split_packets_cuts_complete_packets_and_keeps_the_rest() -> None:
    # remaining lengths of 1, 2 and 3 bytes
    packets = [_publish("a/b", b"x" * 3, 1), _publish("a/c", b"y" * 200, 2), _publish("a/d", b"z" * 20000, 3)]
    stream = b"".join(packets)
    ends = [sum(len(p) for p in packets[: i + 1]) for i in range(len(packets))]
    for cut in range(len(stream) + 1):
        found, used = split_packets(stream[:cut])
        complete = [e for e in ends if e <= cut]
        assert used == (complete[-1] if complete else 0)
        assert len(found) == len(complete)
        for (first, start, end), p in zip(found, packets, strict=False):
            assert first == 0x32 and stream[start:end] == p[len(p) - (end - start):]


def test_a_remaining_length_over_four_bytes_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="4 bytes"):
        split_packets(b"\x30\xff\xff\xff\xff\x01")


def test_connect_packet_is_mqtt_3_1_1() -> None:
    assert connect_packet("c", keepalive=30, clean_session=False, username="u", password="p") == (
        b"\x10\x13\x00\x04MQTT\x04\xc0\x00\x1e\x00\x01c\x00\x01u\x00\x01p"
    )
    assert connect_packet("c", keepalive=5, clean_session=True, username=None, password=None) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x05\x00\x01c"
    )


def test_qos_2_subscriptions_are_refused() -> None:
    with pytest.raises(ValueError, match="QoS 0 or 1"):
        IngestLink(url="mqtt://127.0.0.1:1", client_id="x", subscriptions=[("a/#", 2)], on_batch=print)


def test_messages_in_the_same_read_as_connack_are_delivered_and_acknowledged() -> None:
    """A broker holding a session sends its queued messages right behind CONNACK; when they
    arrive in one read, none may be lost. A scripted peer on a real socket makes that certain
    (with Mosquitto it depends on timing)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray()  # SUBSCRIBE and the PUBACKs, in whatever reads they come

    def peer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(1024)  # CONNECT
            conn.sendall(b"\x20\x02\x01\x00" + b"".join(_publish("f/d/telemetry", b"m%d" % i, i) for i in (1, 2, 3)))
            while b"\x40\x02\x00\x03" not in received:
                chunk = conn.recv(1024)
                if not chunk:
                    return
                received.extend(chunk)
            conn.sendall(b"\x90\x03\x00\x01\x01")  # SUBACK
            while conn.recv(1024):  # until the link says goodbye
                pass

    t = threading.Thread(target=peer)
    t.start()
    sink = Sink()
    link = IngestLink(url=f"mqtt://127.0.0.1:{port}", client_id="x", subscriptions=[("f/+/telemetry", 1)],
                      on_batch=sink)
    link.start()
    try:
        wait_for(lambda: b"\x40\x02\x00\x03" in received, 10, "the PUBACKs")
        assert sink.messages == [("f/d/telemetry", b"m1"), ("f/d/telemetry", b"m2"), ("f/d/telemetry", b"m3")]
        assert received.startswith(b"\x82")  # SUBSCRIBE, then one PUBACK per message, in order
        assert received.endswith(b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03")
        wait_for(link.connected.is_set, 5, "SUBACK")
    finally:
        link.stop()
        t.join(10)
        server.close()


# -- against Mosquitto ----------------------------------------------------------------------------


class Sink:
    """Collects batches; ``gate`` (when set) holds the link's thread inside ``on_batch``."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, bytes]]] = []
        self.gate: threading.Event | None = None

    def __call__(self, batch: list[tuple[str, bytes]]) -> None:
        if self.gate is not None:
            self.gate.wait(30)
        self.batches.append(batch)

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        return [m for b in self.batches for m in b]


def _link(broker: Broker, fleet: str, sink: Sink, cid: str = "hub-test", **kw: object) -> IngestLink:
    link = IngestLink(url=broker.url, client_id=f"{cid}-{fleet}", subscriptions=[(f"{fleet}/+/telemetry", 1)],
                      on_batch=sink, **kw)  # type: ignore[arg-type]
    link.start()
    wait_for(link.connected.is_set, 10, "the link to subscribe")
    return link


def _publish_all(broker: Broker, msgs: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1) for t, p in msgs]
        for i in infos:
            i.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def _messages(fleet: str, n: int, tag: str = "") -> list[tuple[str, bytes]]:
    return [(f"{fleet}/d{i % 7}/telemetry", f"{tag}{i}:".encode() + b"p" * (i % 500)) for i in range(n)]


def test_every_qos1_message_arrives_in_order_in_batches_and_is_acknowledged(broker: Broker, fleet: str) -> None:
    sink = Sink()
    link = _link(broker, fleet, sink)
    msgs = [*_messages(fleet, 3000), (f"{fleet}/big/telemetry", b"B" * 300_000)]  # many reads
    _publish_all(broker, msgs)
    wait_for(lambda: len(sink.messages) >= len(msgs), 20, "every message")
    assert sink.messages == msgs  # one publisher, one subscriber: order kept, nothing twice
    assert len(sink.batches) < len(msgs)  # several messages per call (and per PUBACK send)
    assert link.received == len(msgs) and link.connections == 1
    link.stop()
    # The same session again: everything was acknowledged, so nothing comes back.
    again = Sink()
    link = _link(broker, fleet, again)
    time.sleep(1.0)
    link.stop()
    assert again.messages == []


def test_a_persistent_session_gets_what_was_published_while_away(broker: Broker, fleet: str) -> None:
    """The broker sends the queued messages right behind CONNACK, often in the same read."""
    _link(broker, fleet, Sink()).stop()
    msgs = _messages(fleet, 2000)
    _publish_all(broker, msgs)
    sink = Sink()
    link = _link(broker, fleet, sink)
    wait_for(lambda: len(sink.messages) >= len(msgs), 20, "the queued messages")
    time.sleep(0.3)
    link.stop()
    assert sink.messages == msgs and link.connections == 1


def test_a_consumer_that_blocks_in_on_batch_loses_nothing_and_keeps_its_connection(
    broker: Broker, fleet: str
) -> None:
    sink = Sink()
    sink.gate = threading.Event()
    link = _link(broker, fleet, sink)
    msgs = _messages(fleet, 500)
    done = threading.Thread(target=_publish_all, args=(broker, msgs))
    done.start()
    time.sleep(1.0)
    assert sink.batches == []  # precondition: the first batch is still held in on_batch
    sink.gate.set()
    done.join(30)
    wait_for(lambda: len(sink.messages) >= len(msgs), 20, "every message after the hold")
    link.stop()
    assert sink.messages == msgs and link.connections == 1


def test_an_idle_link_keeps_its_connection_with_pings(broker: Broker, fleet: str) -> None:
    sink = Sink()
    link = _link(broker, fleet, sink, keepalive=2)  # the broker drops it after 3 s of silence
    time.sleep(4.5)
    _publish_all(broker, _messages(fleet, 3))
    wait_for(lambda: len(sink.messages) == 3, 10, "messages after the idle time")
    link.stop()
    assert link.connections == 1


def test_the_link_comes_back_after_a_broker_restart(broker: Broker, fleet: str) -> None:
    sink = Sink()
    link = _link(broker, fleet, sink)
    broker.stop()
    wait_for(lambda: not link.connected.is_set(), 10, "the link to notice")
    broker.start()  # no persistence: the link subscribes again on its own
    wait_for(link.connected.is_set, 20, "the link to reconnect")
    _publish_all(broker, _messages(fleet, 10))
    wait_for(lambda: len(sink.messages) == 10, 10, "messages after the restart")
    link.stop()
    assert link.connections == 2


def test_a_refused_password_is_logged_and_retried_not_fatal(
    tmp_path: Path, fleet: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert mosquitto_bin()
    b = Broker(tmp_path)
    (tmp_path / "passwd").write_text(f"hub:{hash_password('right')}\n")
    b.conf.write_text(f"listener {b.port} 127.0.0.1\nallow_anonymous false\npersistence false\n"
                      f"password_file {tmp_path / 'passwd'}\n"
                      # as root Mosquitto would become 'mosquitto', who cannot read tmp_path
                      + ("user root\n" if os.geteuid() == 0 else ""))
    b.start()
    try:
        caplog.set_level(logging.WARNING, "edgefleet.hub.ingest")
        wrong = IngestLink(url=b.url, client_id="w", subscriptions=[(f"{fleet}/#", 1)], on_batch=Sink(),
                           username="hub", password="wrong")
        wrong.start()
        wait_for(lambda: "refused the connection" in caplog.text, 10, "the refusal in the log")
        assert not wrong.connected.is_set()
        wrong.stop()
        sink = Sink()
        right = IngestLink(url=b.url, client_id="r", subscriptions=[(f"{fleet}/+/telemetry", 1)], on_batch=sink,
                           username="hub", password="right")
        right.start()
        wait_for(right.connected.is_set, 10, "the link with the right password")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.username_pw_set("hub", "right")
        c.connect("127.0.0.1", b.port)
        c.loop_start()
        c.publish(f"{fleet}/d/telemetry", b"hello", qos=1).wait_for_publish(10)
        c.disconnect()
        c.loop_stop()
        wait_for(lambda: sink.messages == [(f"{fleet}/d/telemetry", b"hello")], 10, "the message")
        right.stop()
    finally:
        b.stop()
