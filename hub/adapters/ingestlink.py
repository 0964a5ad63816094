"""The hub's receiving end for device messages: a small MQTT 3.1.1 subscriber of its own.

Why not paho (which the hub still uses to publish, :class:`agent.adapters.mqttlink.MqttLink`): paho
reads each packet with several ``recv`` calls, builds a message object, matches it against the
callbacks' filters and sends every PUBACK on its own, about 38 µs per message on our machine —
more than the hub's whole work on a telemetry window (about 50 µs: parse, dedup, SQLite,
drift sums). ``bench/ingest.py`` measures the difference. This link reads the socket in large
chunks, cuts every complete PUBLISH out of the buffer, hands them to ``on_batch`` in one call
and answers them with one ``send`` of PUBACKs — after ``on_batch`` returns, so a message is
acknowledged only once it is in the hub's inbox (paho's order too). When the inbox is full
``on_batch`` blocks, this link stops reading, and the broker stops sending after its
``max_inflight_messages`` unacknowledged ones: backpressure instead of an unbounded queue.

It does only what the hub's ingest needs: CONNECT (user/password, TLS with a pinned CA or the
system's, persistent session), SUBSCRIBE at QoS ≤ 1, PUBLISH at QoS 0/1 in, PUBACK and
PINGREQ out, reconnect with jittered backoff (to the next node when ``url`` lists several). Anything else from the broker (QoS 2 flow, a packet a
client never gets) is a protocol error: the connection is dropped and made again. One thread
does all socket I/O (an ``ssl`` socket must not be read and written from two threads).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence

from edgefleet.agent.contract.broker import BrokerAddress, parse_broker_urls
from edgefleet.agent.core.reconnect import Failover

__all__ = ["IngestLink", "ProtocolError", "connect_packet", "split_packets"]

log = logging.getLogger("edgefleet.hub.ingest")

Batch = list[tuple[str, bytes]]  # (topic, payload)

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
_PUBLISH, _CONNACK, _SUBACK, _PINGRESP = 3, 2, 9, 13


class ProtocolError(Exception):
    """The broker sent something this client does not expect: the connection is dropped."""


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def connect_packet(client_id: str, *, keepalive: int, clean_session: bool, username: str | None,
                   password: str | None) -> bytes:
    """CONNECT, MQTT 3.1.1."""
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if username is not None and password is not None else 0
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _string(client_id)
    if username is not None:
        body += _string(username)
        if password is not None:
            body += _string(password)
    return _packet(0x10, body)


def subscribe_packet(packet_id: int, subscriptions: Sequence[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(t) + bytes([q]) for t, q in subscriptions)
    return _packet(0x82, body)


def split_packets(buf: bytearray | bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The complete packets at the start of ``buf``: ``([(first byte, body start, body end)],
    bytes used)``. A remaining length longer than MQTT's four bytes is a :class:`ProtocolError`."""
    out: list[tuple[int, int, int]] = []
    pos, size = 0, len(buf)
    while pos + 2 <= size:
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= size:
                return out, pos  # the length itself is not complete yet
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("remaining length longer than 4 bytes")
        end = i + length
        if end > size:
            break
        out.append((buf[pos], i, end))
        pos = end
    return out, pos


class IngestLink:
    """Subscribe ``subscriptions`` and deliver PUBLISHes to ``on_batch`` in batches.

    ``on_batch(messages)`` runs on this link's thread; it may block (that is the backpressure),
    and it must not raise (an exception is logged and the connection made again, so the broker
    delivers the unacknowledged messages again).
    """

    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        on_batch: Callable[[Batch], None],
        ca_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = False,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
    ) -> None:
        if any(q not in (0, 1) for _, q in subscriptions):
            raise ValueError(f"IngestLink subscribes at QoS 0 or 1 only, got {list(subscriptions)}")
        self.addresses = parse_broker_urls(url)
        self._failover = Failover(len(self.addresses))
        self.client_id = client_id
        self._subs = list(subscriptions)
        self._on_batch = on_batch
        self._ca_file = ca_file
        self._username, self._password = username, password  # None: the URL's
        self._clean = clean_session
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0  # PUBLISH packets handed to on_batch
        self.connections = 0  # CONNACKs accepted

    @property
    def address(self) -> BrokerAddress:
        """The broker node connected to, or tried next."""
        return self.addresses[self._failover.index]

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-ingest-{self.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT (the session stays with the broker) and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            sock: socket.socket | None = None
            addr = self.address
            try:
                sock, pending = self._open()
                self._failover.connected()
                self._serve(sock, pending)
            except (OSError, ProtocolError) as exc:
                if not self._stop.is_set():
                    log.warning("ingest link %s to %s:%s: %s", self.client_id, addr.host, addr.port, exc)
            except Exception:  # on_batch raised: the broker resends what was not acknowledged
                log.exception("ingest link %s: delivery failed", self.client_id)
            finally:
                self.connected.clear()
                if sock is not None:
                    sock.close()
            _, delay = self._failover.failed()
            if not self._stop.is_set():
                log.info("ingest link %s: reconnecting to %s:%s in %.1f s", self.client_id,
                         self.address.host, self.address.port, delay)
            if self._stop.wait(delay):
                break

    # -- one connection ------------------------------------------------------------------------

    def _open(self) -> tuple[socket.socket, bytearray]:
        """Connect, check CONNACK, send SUBSCRIBE: the socket and what followed CONNACK (a
        broker with a session for us sends its queued messages right after it)."""
        addr = self.address
        sock = socket.create_connection((addr.host, addr.port), timeout=self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if addr.tls:
                ctx = ssl.create_default_context(cafile=self._ca_file)  # hostname checked
                sock = ctx.wrap_socket(sock, server_hostname=addr.host)
            user, password = (self._username, self._password) if self._username else (addr.username, addr.password)
            sock.sendall(connect_packet(self.client_id, keepalive=self._keepalive, clean_session=self._clean,
                                        username=user, password=password))
            buf = bytearray()
            while True:
                packets, _ = split_packets(buf)
                if packets:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    raise ProtocolError("the broker closed the connection before CONNACK")
                buf += chunk
            first, start, end = packets[0]
            body = buf[start:end]
            if first >> 4 != _CONNACK or len(body) != 2:
                raise ProtocolError(f"expected CONNACK, got packet type {first >> 4}")
            if body[1]:
                reason = CONNACK_REASONS.get(body[1], f"code {body[1]}")
                raise ProtocolError(f"the broker refused the connection: {reason}")
            del buf[:end]
            self.connections += 1
            sock.sendall(subscribe_packet(1, self._subs))
        except BaseException:
            sock.close()
            raise
        return sock, buf

    def _serve(self, sock: socket.socket, buf: bytearray) -> None:
        sock.settimeout(min(0.5, self._keepalive / 4))
        last_sent = last_heard = time.monotonic()
        pinged = False
        if self._deliver(sock, buf):  # what followed CONNACK
            last_sent = time.monotonic()
        while not self._stop.is_set():
            try:
                chunk = sock.recv(262144)
            except TimeoutError:  # socket.timeout is its alias
                now = time.monotonic()
                if now - last_heard > self._keepalive * 1.5:
                    raise ProtocolError(f"nothing from the broker for {self._keepalive * 1.5:.0f} s") from None
                if now - last_sent >= self._keepalive / 2 and not pinged:
                    sock.sendall(b"\xc0\x00")  # PINGREQ
                    last_sent, pinged = now, True
                continue
            if not chunk:
                raise ProtocolError("the broker closed the connection")
            last_heard, pinged = time.monotonic(), False
            buf += chunk
            if self._deliver(sock, buf):
                last_sent = last_heard
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT: a clean goodbye, the session stays

    def _deliver(self, sock: socket.socket, buf: bytearray) -> bool:
        """Hand the complete packets at the start of ``buf`` to ``on_batch``, then acknowledge
        them and cut them off ``buf``; true if PUBACKs were sent."""
        packets, used = split_packets(buf)
        if not packets:
            return False
        messages, acks = self._handle(buf, packets)
        del buf[:used]
        if messages:
            self._on_batch(messages)
            self.received += len(messages)
        if acks:
            sock.sendall(b"".join(acks))
        return bool(acks)

    def _handle(self, buf: bytearray, packets: list[tuple[int, int, int]]) -> tuple[Batch, list[bytes]]:
        """The PUBLISHes among ``packets`` (cut from ``buf``) and the PUBACKs they need."""
        messages: Batch = []
        acks: list[bytes] = []
        for first, start, end in packets:
            kind = first >> 4
            if kind == _PUBLISH:
                qos = (first >> 1) & 3
                tlen = (buf[start] << 8) | buf[start + 1]
                p = start + 2 + tlen
                topic = buf[start + 2:p].decode(errors="replace")  # the broker checks UTF-8
                if qos == 1:
                    acks.append(b"\x40\x02" + buf[p:p + 2])
                    p += 2
                elif qos:
                    raise ProtocolError(f"PUBLISH at QoS {qos}: this link subscribes at QoS 0 or 1")
                messages.append((topic, bytes(buf[p:end])))
            elif kind == _SUBACK:
                codes = buf[start + 2:end]
                refused = [t for (t, _), code in zip(self._subs, codes, strict=False) if code == 0x80]
                if refused:
                    log.error("ingest link %s: the broker refused the subscriptions %s (check its ACL)",
                              self.client_id, refused)
                else:
                    self.connected.set()
                    log.info("ingest link %s subscribed to %d topic filters", self.client_id, len(self._subs))
            elif kind != _PINGRESP:
                raise ProtocolError(f"unexpected packet type {kind}")
        return messages, acks
