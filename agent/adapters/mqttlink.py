"""A thin paho-mqtt 2.x adapter shared by agent and hub.

It owns one client and its network thread; everything it receives goes to one ``on_message``
callable that must not block (the agent puts messages on a queue). Exceptions raised by our
callbacks are logged and swallowed here, because an exception inside a paho callback kills the
network thread. Subscriptions are (re)made in ``on_connect``, so they survive reconnects.

MQTT 3.1.1 by default: it is what every broker speaks (the embedded amqtt broker speaks nothing
else) and paho receives faster on it than on 5.0 here.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["BrokerAddress", "MqttLink", "parse_broker_url"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://host[:8883]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


Handler = Callable[[str, bytes, bool], None]


class MqttLink:
    def __init__(
        self,
        *,
        url: str,
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
    ) -> None:
        self.address = parse_broker_url(url)
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
        c.reconnect_delay_set(min_delay=1, max_delay=30)
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
        c.on_message = self._handle_message
        if on_publish is not None:
            c.on_publish = self._handle_publish
        self.client = c

    # paho callbacks: never raise, never block.
    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        try:
            if getattr(rc, "is_failure", False):
                log.warning("broker %s:%s refused the connection: %s", self.address.host, self.address.port, rc)
                return
            for topic, qos in self._subs:
                client.subscribe(topic, qos)
            self.connected.set()
            if self._on_connect_cb is not None:
                self._on_connect_cb()
        except Exception:
            log.exception("error in on_connect handler")

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        self.connected.clear()

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
