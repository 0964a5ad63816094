"""A root rotation on the broker operators are given: the configuration `edgefleet-hub
broker-config` writes (TLS, client certificates, passwords, the ACL), a hub process and an agent
process enrolled with `device add`. tests/system/test_rotation_live.py runs on an anonymous broker
without an ACL, so it cannot see a rotation the ACL keeps from devices.

The ceremony is the documented one, with the root private key kept offline from `init` on (the
hub and enrolment use keys/root.pub alone): stop the hub, rotate the root and then the signing key
(the old one revoked) with --root-key pointing at the offline copy, restart the hub. The device
must adopt root 2, trust the keyring it signs, and keep updating with states signed by the new
signing key.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests._securebroker import GeneratedBroker, start_generated_broker
from tests.conftest import Procs, free_port, hub_up, run_cli, wait_for
from tests.simulator import tiny_model

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HUB = "edgefleet.hub.cli.main"


class SecureFleet:
    def __init__(self, tmp: Path, procs: Procs, fleet: str) -> None:
        self.tmp, self.procs, self.fleet = tmp, procs, fleet
        self.home = tmp / "hub"
        self.http_port = free_port()
        run_cli(HUB, "init", "--home", str(self.home), "--fleet", fleet, "--http", f"127.0.0.1:{self.http_port}")
        self.offline = tmp / "usb" / "root.pem"  # the root private key leaves the hub home at once
        self.offline.parent.mkdir()
        shutil.move(self.home / "keys" / "root.pem", self.offline)
        self.broker: GeneratedBroker = start_generated_broker(self.home, fleet, tmp)
        self.hub: subprocess.Popen[bytes] | None = None

    def cli(self, *argv: str) -> str:
        return run_cli(HUB, *argv, "--home", str(self.home)).stdout

    def start_hub(self) -> None:
        self.hub = self.procs.start("hub", HUB, "serve", "--home", str(self.home))
        wait_for(lambda: hub_up(self.http_port), 20, "hub HTTP")

    def stop_hub(self) -> None:
        assert self.hub is not None
        self.hub.send_signal(signal.SIGTERM)
        assert self.hub.wait(15) == 0

    def publish(self, version: str, scale: float) -> None:
        model = self.tmp / f"m{version}.onnx"
        model.write_bytes(tiny_model(scale))
        self.cli("publish", "--name", "m", "--version", version, str(model))

    def device(self, dev: str) -> dict[str, Any]:
        st = json.loads(self.cli("status", "--json"))
        return dict(next(d for d in st["devices"] if d["device"] == dev))

    def events(self, dev: str) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("events", "--device", dev, "--json"))["events"])

    def runs(self, dev: str, version: str) -> bool:
        return self.device(dev)["models"].get("m") == version


def test_a_root_rotation_reaches_a_device_behind_the_generated_acl(tmp_path: Path, procs: Procs,
                                                                  fleet: str) -> None:
    env = SecureFleet(tmp_path, procs, fleet)
    try:
        env.start_hub()
        bundle = tmp_path / "dev-1"
        env.cli("device", "add", "dev-1", "--out", str(bundle), "--listen", f"127.0.0.1:{free_port()}",
                "--window", "1")
        assert 'cert_file = "client.pem"' in (bundle / "agent.toml").read_text()  # the TLS listener
        procs.start("agent", "edgefleet.agent.app.cli", "run", "--config", str(bundle / "agent.toml"))
        env.publish("1.0.0", 1.0)
        env.cli("deploy", "m", "1.0.0", "--device", "dev-1")
        wait_for(lambda: env.runs("dev-1", "1.0.0"), 40, "dev-1 to run m 1.0.0 over TLS")

        env.stop_hub()  # the ceremony: hub stopped, root rotated, then the signing key
        env.cli("keys", "rotate-root", "--root-key", str(env.offline))
        env.cli("keys", "rotate-signing", "--root-key", str(env.offline))
        keys = json.loads(env.cli("keys", "show", "--json"))
        assert keys["root_version"] == 2 and len(keys["revoked"]) == 1
        assert keys["root_private_key"] == "offline" and not (env.home / "keys" / "root.pem").exists()
        env.start_hub()

        wait_for(lambda: [e for e in env.events("dev-1") if e["type"] == "root_rotated"], 30,
                 "dev-1 to adopt root version 2 (a root_rotated event)")
        env.publish("2.0.0", 2.0)
        env.cli("deploy", "m", "2.0.0", "--device", "dev-1")
        wait_for(lambda: env.runs("dev-1", "2.0.0"), 40,
                 "dev-1 to run m 2.0.0, signed by the key of the keyring root 2 signed")
        events = env.events("dev-1")
        rotated = [e for e in events if e["type"] == "root_rotated"]
        assert [e["message"] for e in rotated] == ["trusting root version 2"], rotated
        refused = [(e["reason"], e["message"]) for e in events if e["type"] == "refused"]
        assert refused == [], refused
        state = json.loads((bundle / "state" / "state.json").read_text())
        assert len(state["roots"]) == 1  # the chain is persisted: a restart still trusts root 2
    except BaseException:
        print(env.broker.logs())
        raise
    finally:
        env.broker.stop()
