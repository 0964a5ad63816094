"""Device groups: an optional group id stored with each device, and deploy targets by group.

A group id follows the device id rules (:func:`agent.contract.wire.check_name`). The column
``devices.device_group`` is added to a database created before groups existed when it is opened
(schema version 1 of :mod:`edgefleet.hub.db`), so an old hub home keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.wire import check_name
from edgefleet.hub.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from edgefleet.hub.db import Database

__all__ = ["check_group", "deploy_targets", "group_of", "known_groups"]


def check_group(value: object) -> str | None:
    """``None``/empty means no group; anything else must be a valid id, else :class:`BadRequest`."""
    if value is None or value == "":
        return None
    try:
        return check_name(value, "group id")
    except MalformedMessage as exc:
        raise BadRequest(str(exc)) from exc


def known_groups(db: Database) -> list[str]:
    return db.group_ids()


def group_of(row: Mapping[str, Any]) -> str | None:
    value = row.get("device_group")
    return str(value) if value else None


def deploy_targets(db: Database, req: Mapping[str, Any]) -> list[str]:
    """The devices a deploy request names: ``devices`` and every member of ``groups`` (the
    union, in the order given, without repeats). Unknown devices are left to the caller's check;
    a group without a device is refused, naming the known groups."""
    devices = req.get("devices") or []
    groups = req.get("groups") or []
    if not isinstance(devices, list) or not isinstance(groups, list):
        raise BadRequest("devices and groups must be lists of ids")
    if not devices and not groups:
        raise BadRequest("name at least one device (--device) or group (--group) to deploy to")
    # dict keys: the union in the order given, without repeats, in linear time (10,000 devices)
    out = dict.fromkeys(devices)
    for g in groups:
        group = check_group(g)
        members = db.group_members(group)
        if not members:
            known = known_groups(db)
            raise NotFound(
                f"group {group!r} has no device; known groups: {', '.join(known) if known else 'none'} "
                "(set a device's group with `edgefleet-hub device add ID --group G`)"
            )
        out.update(dict.fromkeys(members))
    return list(out)
