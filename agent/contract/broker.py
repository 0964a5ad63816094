"""Broker addresses: ``mqtt://`` and ``mqtts://`` URLs, one broker or the nodes of a cluster."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["BrokerAddress", "client_id", "escape_name", "parse_broker_url", "parse_broker_urls"]


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


def parse_broker_urls(urls: str | Sequence[str]) -> list[BrokerAddress]:
    """One URL, several comma-separated in one string, or a list of them: the nodes of one broker
    (a cluster), so they all take the same transport (all ``mqtt://`` or all ``mqtts://``)."""
    items = [u.strip() for u in urls.split(",")] if isinstance(urls, str) else [str(u).strip() for u in urls]
    if not items or not all(items):
        raise ValueError(f"broker URLs must be one or more mqtt://HOST:PORT or mqtts://HOST:PORT separated "
                         f"by commas, got {urls!r}")
    addresses = [parse_broker_url(u) for u in items]
    if len({a.tls for a in addresses}) > 1:
        raise ValueError(f"broker URLs must all be mqtt:// or all mqtts:// (one broker, several nodes), got {urls!r}")
    return addresses


def escape_name(name: str) -> str:
    """A fleet, device or replica name without ``.``: ``_`` written ``__`` and ``.`` written
    ``_d``, one to one (NATS takes no ``.`` in MQTT client ids nor in stream names)."""
    return name.replace("_", "__").replace(".", "_d")


def client_id(kind: str, fleet: str, name: str = "") -> str:
    """An MQTT client id every broker takes: ``edgefleet-{kind}-{fleet}[-{name}]``, the names
    escaped (:func:`escape_name`), so two devices never share an id."""
    return f"edgefleet-{kind}-{escape_name(fleet)}" + (f"-{escape_name(name)}" if name else "")
