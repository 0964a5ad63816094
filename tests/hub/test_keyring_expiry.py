"""The hub warns ahead of the keyring's expiry, since only the holder of the (offline) root key can
renew it: an ``edgefleet.alert/v1`` of type ``keyring`` on ``{root}hub/alerts`` and a line at the
top of ``edgefleet-hub status``, from 30 days before; ``keys renew-keyring`` clears it."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.contract.envelope import open_envelope
from edgefleet.agent.contract.wire import Keyring, Topics, parse_json_object
from edgefleet.hub.adapters.home import HubHome, keyring_path
from edgefleet.hub.core.desired import KEYRING_LIFETIME_DAYS, KEYRING_RENEW_DAYS
from edgefleet.hub.daemon import Hub
from edgefleet.hub.services.keys import renew_keyring
from tests.conftest import Broker, Procs, free_port, hub_up, run_cli, wait_for

DAY = 86400.0
T0 = 1_800_000_000.0


class Link:
    """Stands in for the hub's MQTT link: records what the hub publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, json.loads(payload)))


def _ring(home: HubHome) -> Keyring:
    return Keyring.from_dict(parse_json_object(open_envelope(keyring_path(home).read_bytes()).payload))


@pytest.fixture
def home(tmp_path: Path) -> HubHome:
    h = HubHome(tmp_path / "hub")
    h.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    return h


def test_init_and_ceremonies_sign_keyrings_that_expire_in_a_year(home: HubHome) -> None:
    ring = _ring(home)
    assert ring.expires_at is not None
    assert ring.expires_at - ring.issued_at == KEYRING_LIFETIME_DAYS * DAY == 365 * DAY
    renewed = renew_keyring(home, now=T0)
    assert (renewed.version, renewed.keys, renewed.expires_at) == (2, ring.keys, T0 + 365 * DAY)
    assert _ring(home) == renewed


def test_the_hub_warns_30_days_ahead_then_daily_until_renewed(home: HubHome) -> None:
    renew_keyring(home, now=T0, lifetime_days=40)  # expires at T0 + 40 days
    now = [T0]
    hub = Hub(home, clock=lambda: now[0])
    link = Link()
    hub.link = link  # type: ignore[assignment]
    alerts = lambda: [a for t, a in link.sent if t == Topics("f").alerts]  # noqa: E731
    try:
        hub._watch_keyring()
        assert alerts() == [] and hub.status()["keyring"]["state"] == "ok"

        now[0] = T0 + (40 - KEYRING_RENEW_DAYS) * DAY + 1  # 30 days left
        hub._watch_keyring()
        hub._watch_keyring()  # the same day: no second alert
        assert [(a["type"], a["state"], a["keyring_version"]) for a in alerts()] == [("keyring", "renew", 2)]
        a = alerts()[0]
        assert a["kind"] == "edgefleet.alert/v1" and a["fleet"] == "f" and 29.9 < a["days_left"] <= 30
        assert "keys renew-keyring --root-key" in a["message"]
        st = hub.status()["keyring"]
        assert st["state"] == "renew" and st["version"] == 2

        now[0] += DAY  # a day later: said again
        hub._watch_keyring()
        assert len(alerts()) == 2
        now[0] = T0 + 40 * DAY  # expired: said at once
        hub._watch_keyring()
        assert [a["state"] for a in alerts()] == ["renew", "renew", "expired"]
        assert hub.status()["keyring"]["state"] == "expired"
    finally:
        hub.db.close()
    renew_keyring(home, now=now[0])  # the ceremony (hub stopped), then a restart
    hub = Hub(home, clock=lambda: now[0])
    hub.link = link  # type: ignore[assignment]
    try:
        hub._watch_keyring()
        assert len(alerts()) == 3 and hub.status()["keyring"]["state"] == "ok"
    finally:
        hub.db.close()


def test_a_keyring_from_before_expiry_is_shown_as_such_without_alerts(home: HubHome) -> None:
    from edgefleet.agent.contract.envelope import sign_envelope

    old = _ring(home)
    legacy = Keyring(fleet="f", version=old.version, keys=old.keys, issued_at=old.issued_at)
    keyring_path(home).write_bytes(sign_envelope(legacy.to_dict(), [home.root_key()]))
    hub = Hub(home, clock=lambda: T0)
    hub.link = link = Link()  # type: ignore[assignment]
    try:
        hub._watch_keyring()
        assert link.sent == []
        st = hub.status()["keyring"]
        assert st["state"] == "no_expiry" and "renew-keyring" in st["message"]
    finally:
        hub.db.close()


@pytest.mark.broker
def test_status_and_hub_alerts_say_when_the_keyring_must_be_renewed(
    tmp_path: Path, broker: Broker, procs: Procs
) -> None:
    home, port = tmp_path / "hub", free_port()
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", "fx", "--broker", broker.url,
            "--http", f"127.0.0.1:{port}")
    media = tmp_path / "usb"
    media.mkdir()
    (home / "keys" / "root.pem").rename(media / "root.pem")
    run_cli("edgefleet.hub.cli.main", "keys", "renew-keyring", "--home", str(home),
            "--root-key", str(media / "root.pem"), "--lifetime-days", "12")
    got: list[dict[str, Any]] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, m: got.append(json.loads(m.payload))
    c.connect("127.0.0.1", broker.port)
    c.subscribe(Topics("fx").alerts, 1)
    c.loop_start()
    try:
        hub = procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home))
        wait_for(lambda: hub_up(port), 20, "hub HTTP")
        wait_for(lambda: [a for a in got if a.get("type") == "keyring"], 20, "a keyring alert on hub/alerts")
        alert = next(a for a in got if a.get("type") == "keyring")
        assert alert["state"] == "renew" and alert["keyring_version"] == 2 and alert["days_left"] <= 12
        lines = run_cli("edgefleet.hub.cli.main", "status", "--home", str(home)).stdout.splitlines()
        assert lines[1].startswith("WARNING: keyring v2 expires at ") and "renew-keyring" in lines[1]
        assert json.loads(run_cli("edgefleet.hub.cli.main", "status", "--home", str(home),
                                  "--json").stdout)["keyring"]["state"] == "renew"
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(15) == 0
        run_cli("edgefleet.hub.cli.main", "keys", "renew-keyring", "--home", str(home),
                "--root-key", str(media / "root.pem"))
        procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home))
        wait_for(lambda: hub_up(port), 20, "hub HTTP after the renewal")
        lines = run_cli("edgefleet.hub.cli.main", "status", "--home", str(home)).stdout.splitlines()
        assert not any(line.startswith("WARNING") for line in lines), lines
    finally:
        c.loop_stop()
        c.disconnect()
