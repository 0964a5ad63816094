"""A thin paho-mqtt 2.x adapter shared by agent and hub.

It owns one client and its network thread; everything it receives goes to one ``on_message``
callable that must not block (the agent puts messages on a queue). Exceptions raised by our
callbacks are logged and swallowed here, because an exception inside a paho callback kills the
network thread. Subscriptions are (re)made in ``on_connect``, so they survive reconnects.

MQTT 3.1.1 by default: it is what every broker speaks (the embedded amqtt broker speaks nothing
else, nor does NATS's MQTT listener) and paho receives faster on it than on 5.0 here.

Several brokers (the nodes of a cluster): ``url`` may list them, comma-separated. The link starts
on one drawn at random and, whenever the connection drops or an attempt fails, moves to the next
after a jittered wait (:class:`agent.core.reconnect.Failover`); paho's own reconnect loop does the
waiting, with its delay set before each wait.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.contract.broker import BrokerAddress, parse_broker_url, parse_broker_urls
from edgefleet.agent.core.reconnect import Failover

__all__ = ["BrokerAddress", "MqttLink", "parse_broker_url", "parse_broker_urls"]

log = logging.getLogger(__name__)


Handler = Callable[[str, bytes, bool], None]


class MqttLink:
    def __init__(
        self,
        *,
        url: str | Sequence[str],
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        on_message: Handler,
        on_connect: Callable[[], None] | None = None,
        on_publish: Callable[[int], None] | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        keepalive: int = 30,
        max_inflight: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        self.addresses = parse_broker_urls(url)
        self.failover = Failover(len(self.addresses), rng=rng)
        self._explicit_credentials = bool(username)
        self._subs = list(subscriptions)
        self._on_message = on_message
        self._on_connect_cb = on_connect
        self._on_publish_cb = on_publish
        self._keepalive = keepalive
        self.connected = threading.Event()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=1)  # replaced before every wait: _next_broker
        # Credentials given apart from the URL (read from a 0600 file) win over the URL's.
        if username:
            c.username_pw_set(username, password)
        elif self.address.username:
            c.username_pw_set(self.address.username, self.address.password)
        if will is not None:
            topic, payload, qos, retain = will
            c.will_set(topic, payload, qos=qos, retain=retain)
        if self.address.tls:
            c.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_connect_fail = self._handle_connect_fail
        c.on_message = self._handle_message
        if on_publish is not None:
            c.on_publish = self._handle_publish
        self.client = c

    @property
    def address(self) -> BrokerAddress:
        """The broker this link is connected to, or tries next."""
        return self.addresses[self.failover.index]

    def _next_broker(self) -> None:
        """The connection (or an attempt) failed: point paho at the next broker and set the wait
        its reconnect loop makes before trying it (paho calls this on its network thread, with
        the socket closed or closing)."""
        _, delay = self.failover.failed()
        addr = self.address
        c = self.client
        # paho's host/port setters refuse while its reconnect loop runs (the state is "connection
        # lost", not "disconnected"), and it has no other way to move a client to another
        # broker: its reconnect() reads these two attributes (tests/agent/test_failover.py checks).
        c._host, c._port = addr.host, addr.port
        if not self._explicit_credentials and addr.username:
            c.username_pw_set(addr.username, addr.password)
        c.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    # paho callbacks: never raise, never block.
    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        try:
            if getattr(rc, "is_failure", False):
                log.warning("broker %s:%s refused the connection: %s", self.address.host, self.address.port, rc)
                return
            self.failover.connected()
            for topic, qos in self._subs:
                client.subscribe(topic, qos)
            self.connected.set()
            if self._on_connect_cb is not None:
                self._on_connect_cb()
        except Exception:
            log.exception("error in on_connect handler")

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        self.connected.clear()
        try:
            self._next_broker()
        except Exception:
            log.exception("error choosing the next broker")

    def _handle_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        try:
            log.warning("cannot reach broker %s:%s", self.address.host, self.address.port)
            self._next_broker()
        except Exception:
            log.exception("error choosing the next broker")

    def _handle_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            log.exception("error handling a message on %s", msg.topic)

    def _handle_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: object = None, props: object = None) -> None:
        # For QoS 1 paho calls this when the broker's PUBACK arrives: the message is the broker's.
        try:
            if self._on_publish_cb is not None:
                self._on_publish_cb(mid)
        except Exception:
            log.exception("error in on_publish handler")

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting while the broker is away."""
        self.client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def stop(self, *, last: tuple[str, bytes, int, bool] | None = None, timeout: float = 2.0) -> None:
        """Publish ``last`` (e.g. an offline status) if connected, then disconnect."""
        if last is not None and self.connected.is_set():
            topic, payload, qos, retain = last
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()
