"""The hub's receiving end on a NATS cluster: device channels from a replicated JetStream stream.

Devices publish over MQTT to any node (:mod:`hub.adapters.natsconf`); NATS turns each publish into
a message on the mapped subject, and a stream of the hub's (``EDGEFLEET_<fleet>``, replicated on
``min(3, nodes)`` nodes, file storage) keeps every ``reported``, ``telemetry``, ``events`` and
``status`` message. Every hub replica reads it through **one shared durable pull consumer**
(``edgefleet-hub``): each message goes to one replica, is acknowledged only after ``on_batch``
returned (it is then in the hub's inbox, as with :class:`hub.adapters.ingestlink.IngestLink`), and
is delivered again to some replica if that one dies first (``ack_wait``). Unlike ``$share``, the
stream also keeps what arrives while no replica runs at all, up to its limits.

What a message loses on the way, and why that is safe: NATS acknowledges a device's QoS 1 publish
once its MQTT layer has it, not once this stream stored it, so a node dying in that instant can
lose the copy. Nothing depends on that copy alone: the agent keeps every telemetry window until
the hub acknowledges it (``wire.TelemetryAck``), re-sends it, and the hub deduplicates by device
and ``seq`` — the same end-to-end rule as on Mosquitto.

The link is the same face as IngestLink (``start``, ``stop``, ``connected``, ``received``); it runs
nats-py on an event loop in a thread of its own and calls ``on_batch`` in the loop's executor, so
a full inbox (backpressure) does not stall NATS's pings. nats-py fails over between the listed
servers itself (randomised order, a wait with jitter between rounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig

from edgefleet.agent.contract.broker import escape_name
from edgefleet.agent.contract.wire import TOPIC_PREFIX
from edgefleet.hub.core.brokeracl import subject_to_topic, topic_to_subject

__all__ = ["DURABLE", "JetStreamIngest", "parse_nats_urls", "stream_name"]

log = logging.getLogger("edgefleet.hub.jetstream")

Batch = list[tuple[str, bytes]]
DURABLE = "edgefleet-hub"
CHANNELS = ("reported", "telemetry", "events", "status")
MAX_AGE_SECONDS = 7 * 86400  # a hub away for a week loses nothing; agents re-send what is older
MAX_BYTES = 8 << 30
ACK_WAIT_SECONDS = 30.0  # a replica that died holding messages: others get them after this
MAX_ACK_PENDING = 20000
FETCHERS = 2  # pull subscriptions per link, each with a fetch in flight


def stream_name(fleet: str) -> str:
    """The fleet's stream (stream names take no ``.``: :func:`escape_name`, one to one)."""
    return "EDGEFLEET_" + escape_name(fleet)


def parse_nats_urls(urls: str) -> list[str]:
    items = [u.strip() for u in urls.split(",")]
    for u in items:
        parts = urlsplit(u)
        if parts.scheme not in ("nats", "tls") or not parts.hostname or not parts.port:
            raise ValueError(f"jetstream_url must be nats://HOST:PORT or tls://HOST:PORT, comma-separated, got {urls!r}")
    return items


class _Puller:
    """Pull requests to the durable consumer on an inbox of its own, the messages gathered by a
    subscription callback. (nats-py's ``fetch`` waits for every message as a task of its own, with
    a uuid and a timer: about 65 µs a message here, as much as the hub's own work on it.)

    One request at a time: ``pull`` asks for ``batch`` messages and returns when they are all in,
    when the server ends the request (a 404/408/409 status: no more, expired, leadership change),
    or ``expires`` plus a margin later (a request lost with a dying consumer leader). A message of
    an earlier request that arrives late joins the next batch; none is dropped."""

    def __init__(self, nc: NatsClient, subject: str) -> None:
        self._nc, self._subject = nc, subject
        self._msgs: list[Msg] = []
        self._want = 0
        self._done = asyncio.Event()
        self.inbox = nc.new_inbox()

    @classmethod
    async def open(cls, nc: NatsClient, stream: str, durable: str) -> _Puller:
        puller = cls(nc, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}")
        await nc.subscribe(puller.inbox, cb=puller._on_msg, pending_msgs_limit=4 * MAX_ACK_PENDING,
                           pending_bytes_limit=1 << 30)
        return puller

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._msgs.append(msg)
            if len(self._msgs) >= self._want:
                self._done.set()
        elif status != "100":  # 100: an idle heartbeat; anything else ends the request
            if status not in ("404", "408", "409"):
                log.warning("jetstream pull on %s: status %s %s", self._subject, status,
                            msg.headers.get("Description") if msg.headers else "")
            self._done.set()

    async def pull(self, batch: int, *, expires: float) -> list[Msg]:
        self._want = batch
        self._done.clear()
        if len(self._msgs) < batch:
            request = json.dumps({"batch": batch - len(self._msgs), "expires": int(expires * 1e9)}).encode()
            await self._nc.publish(self._subject, request, reply=self.inbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), expires + 2.0)
        msgs, self._msgs = self._msgs, []
        return msgs


class JetStreamIngest:
    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        fleet: str,
        on_batch: Callable[[Batch], None],
        prefix: str = TOPIC_PREFIX,
        replicas: int | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        batch: int = 512,
    ) -> None:
        self.servers = parse_nats_urls(url)
        self.client_id = client_id
        self.stream = stream_name(fleet)
        self.subjects = [topic_to_subject(f"{prefix}{fleet}/devices/*/{c}") for c in CHANNELS]
        self.replicas = replicas or min(3, len(self.servers))
        self._on_batch = on_batch
        self._tls: ssl.SSLContext | None = None
        if any(u.startswith("tls://") for u in self.servers) or cert_file:
            self._tls = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                self._tls.load_cert_chain(cert_file, key_file)
        self._batch = batch
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.received = 0
        self.connections = 0
        self._nc_publish: Callable[..., Awaitable[None]]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"jetstream-ingest-{self.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            nc = None
            try:
                nc = await nats.connect(
                    servers=self.servers, name=self.client_id, tls=self._tls, connect_timeout=5,
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1.0,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                    error_cb=self._error, closed_cb=self._closed,
                )
                subs = await self._bind(nc)
                self.connections += 1
                self.connected.set()
                log.info("jetstream ingest %s reads stream %s (R%d) through durable %s on %s", self.client_id,
                         self.stream, self.replicas, DURABLE, nc.connected_url.netloc if nc.connected_url else "?")
                delay = 0.5
                # Several pulls in flight: while one batch is handed over and acknowledged, the next
                # is already on its way (one at a time, a round trip per batch left the inbox idle:
                # 3,000 windows/s here, bench.nats).
                await asyncio.gather(*(self._consume(puller) for puller in subs))
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                if not self._stopping.is_set():
                    log.warning("jetstream ingest %s: %s: %s; again in %.1f s", self.client_id, type(exc).__name__,
                                exc, delay)
            finally:
                self.connected.clear()
                if nc is not None and not nc.is_closed:
                    try:
                        await asyncio.wait_for(nc.close(), 5)
                    except Exception:
                        log.debug("closing the NATS connection failed", exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _bind(self, nc: NatsClient) -> list[_Puller]:
        """Make sure the stream and the shared durable consumer exist (first replica creates them,
        later ones find them), then bind ``FETCHERS`` pull subscriptions to the consumer."""
        js = nc.jetstream(timeout=10)
        config = StreamConfig(name=self.stream, subjects=self.subjects, storage=StorageType.FILE,
                              num_replicas=self.replicas, max_age=MAX_AGE_SECONDS, max_bytes=MAX_BYTES,
                              discard=DiscardPolicy.OLD)
        try:
            info = await js.stream_info(self.stream)
            if sorted(info.config.subjects or []) != sorted(self.subjects):
                await js.update_stream(config)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            log.info("created JetStream stream %s for %s, %d replicas", self.stream, self.subjects, self.replicas)
        await js.add_consumer(self.stream, ConsumerConfig(
            durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=MAX_ACK_PENDING, deliver_policy=DeliverPolicy.ALL, max_deliver=-1))
        self._nc_publish = nc.publish
        return [await _Puller.open(nc, self.stream, DURABLE) for _ in range(FETCHERS)]

    async def _consume(self, puller: _Puller) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            msgs = await puller.pull(self._batch, expires=1.0)
            if not msgs:
                continue
            batch = [(subject_to_topic(m.subject), m.data) for m in msgs]
            try:
                await loop.run_in_executor(None, self._on_batch, batch)
            except Exception:
                log.exception("jetstream ingest %s: delivery failed; the messages come again", self.client_id)
                for m in msgs:
                    await m.nak(delay=1.0)
                continue
            for m in msgs:
                await self._nc_publish(m.reply, b"+ACK")
            self.received += len(msgs)

    async def _disconnected(self) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("jetstream ingest %s: disconnected from NATS; nats-py tries the other nodes", self.client_id)

    async def _reconnected(self) -> None:
        self.connected.set()
        log.info("jetstream ingest %s: reconnected", self.client_id)

    async def _error(self, exc: Exception) -> None:
        log.debug("jetstream ingest %s: %s", self.client_id, exc)

    async def _closed(self) -> None:
        self.connected.clear()
