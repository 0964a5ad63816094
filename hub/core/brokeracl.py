"""The broker's access rules, as data and text: what a device may read and write, and how those
topics and identities are spelled for NATS (subjects, certificate subjects, its users file). Pure:
both broker adapters (:mod:`hub.adapters.brokerconf`, :mod:`hub.adapters.natsconf`) and the PKI's
export of the users file build on it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from edgefleet.agent.contract.wire import TOPIC_PREFIX, Topics

__all__ = ["DEVICE_READS", "DEVICE_WRITES", "admitted_devices", "nats_quote", "subject_to_topic", "topic_to_subject", "user_dn",
           "users_conf_text"]

DEVICE_READS = ("desired", "acked")  # a device's own channels it reads (plus the keyring and roots)
DEVICE_WRITES = ("reported", "telemetry", "events", "status")  # ... and those it writes


def nats_quote(value: str) -> str:
    """A quoted NATS config string (its syntax takes JSON's)."""
    return json.dumps(value)


def topic_to_subject(topic: str) -> str:
    """The NATS subject NATS's MQTT layer gives an MQTT topic (no empty levels in ours)."""
    return ".".join(level.replace(".", "//") for level in topic.split("/"))


def subject_to_topic(subject: str) -> str:
    """The MQTT topic back from a NATS subject: exact for every topic :func:`topic_to_subject` maps."""
    return "/".join(token.replace("//", ".") for token in subject.split("."))


def user_dn(fleet: str, cn: str) -> str:
    """The user NATS's ``verify_and_map`` finds for a certificate of ours: its subject in RFC 4514
    form (:meth:`DevicePki._issue` writes O = ``edgefleet {fleet}`` then CN)."""
    return f"CN={_dn_escape(cn)},O={_dn_escape(f'edgefleet {fleet}')}"


def _dn_escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    return out[:-1] + "\\ " if out.endswith(" ") else out


def users_conf_text(fleet: str, devices: Iterable[str], hub_user: str, prefix: str = TOPIC_PREFIX) -> str:
    """The ``authorization`` block: the hub (everything) and each device (its own channels)."""
    topics = Topics(fleet, prefix)
    root = f"{prefix}{fleet}/"
    lines = [
        f"# edgefleet users for fleet {fleet}, written by the hub: do not edit, it is rewritten at every",
        "# enrolment and revocation. Users are certificate subjects (verify_and_map).",
        "authorization {",
        "  users = [",
        f"    {{ user: {nats_quote(user_dn(fleet, hub_user))}, permissions: {{ publish: \">\", subscribe: \">\" }} }}",
    ]
    for device in sorted(set(devices)):
        subs = [topic_to_subject(f"{root}devices/{device}/{c}") for c in DEVICE_READS]
        subs += [topic_to_subject(t) for t in (topics.keyring, topics.roots)]
        pubs = [topic_to_subject(f"{root}devices/{device}/{c}") for c in DEVICE_WRITES]
        lines.append(
            f"    {{ user: {nats_quote(user_dn(fleet, device))}, permissions: {{ "
            f"publish: {{ allow: {json.dumps(pubs)} }}, subscribe: {{ allow: {json.dumps(subs)} }} }} }}"
        )
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def admitted_devices(credentials: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Devices with an unrevoked certificate (:meth:`DevicePki.device_credentials`); an expired
    one is refused by TLS itself."""
    return sorted(d for d, c in credentials.items()
                  if not c["revoked_at"] and any(not x["revoked_at"] for x in c["certs"]))
