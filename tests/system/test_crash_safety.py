"""Kill the agent at every step of an update, for real, and restart it (Mender's test).

A real Mosquitto carries the retained keyring and desired state; the hub simulator signs them
and serves blobs over HTTP; the agent runs as ``python -m agent.cli run``. A test hook
(``EDGEFLEET_TEST_PAUSE_AT=<step>``) makes the agent write a marker file and sleep at that step;
the test SIGKILLs it there, checks the disk (the state file parses, every blob hashes to its
name), restarts it and checks that what it serves is a verified model: the old or the new one,
never anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.app.updater import STEPS
from edgefleet.agent.contract.wire import Topics
from tests.conftest import REPO, Broker, Procs, free_port, wait_for
from tests.simulator import HubSimulator, tiny_model

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Device:
    """One agent process on its own state directory, restarted at will."""

    def __init__(self, sim: HubSimulator, broker: Broker, procs: Procs, tmp: Path) -> None:
        self.sim, self.broker, self.procs = sim, broker, procs
        self.state = tmp / "state"
        self.port = free_port()
        self.config = tmp / "agent.toml"
        self.config.write_text(
            f'fleet = "{sim.fleet}"\ndevice = "{sim.device}"\n'
            f'broker_url = "{broker.url}"\nblob_url = "{sim.server.url("/")}"\n'
            f'root_public_key = "{sim.provisioned_root}"\n'
            f'profile = "{REPO / "device-profiles" / "generic-x86_64.toml"}"\n'
            f'state_dir = "{self.state}"\nlisten = "127.0.0.1:{self.port}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.topics = Topics(sim.fleet)

    def publish(self, topic: str, payload: bytes) -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", self.broker.port)
        c.loop_start()
        try:
            c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        finally:
            c.disconnect()
            c.loop_stop()

    def deploy(self, version: int) -> None:
        entry = self.sim.entry(str(version), tiny_model(float(version)))
        self.publish(self.topics.desired(self.sim.device), self.sim.desired({"m": entry}))

    def start(self, pause_at: str | None = None) -> None:
        env = {"EDGEFLEET_TEST_PAUSE_AT": pause_at} if pause_at else {"EDGEFLEET_TEST_PAUSE_AT": ""}
        self.proc = self.procs.start(
            "agent", "edgefleet.agent.app.cli", "run", "--config", str(self.config), env=env
        )

    def kill_when_paused(self, step: str) -> None:
        marker = self.state / f"paused-{step}"
        assert self.proc is not None
        wait_for(lambda: marker.exists() or self.proc.poll() is not None, 30, f"pause at {step}")
        assert self.proc.poll() is None, "the agent exited instead of pausing"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        marker.unlink()

    def answer(self) -> tuple[str, float] | None:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{self.port}/v2/models/m/infer",
                timeout=2,
                json={
                    "inputs": [
                        {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}
                    ]
                },
            )
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        body = r.json()
        return str(body["model_version"]), float(body["outputs"][0]["data"][0])

    def check_disk(self) -> dict[str, object]:
        doc = json.loads((self.state / "state.json").read_text())
        for blob in (self.state / "blobs").iterdir():
            if blob.is_file():
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        return dict(doc)

    def wait_serving(self, allowed: set[int], want: int) -> None:
        """Every answer comes from an allowed version (scale == version); ``want`` arrives."""

        def check() -> bool:
            got = self.answer()
            if got is None:
                return False
            version, scale = got
            assert int(version) in allowed, f"served {got}, allowed {allowed}"
            assert scale == float(version), f"version {version} answered with scale {scale}"
            return int(version) == want

        wait_for(check, 30, f"version {want} serving")


@contextlib.contextmanager
def serving_device(broker: Broker, procs: Procs, fleet: str, tmp: Path, config_extra: str = "") -> Iterator[Device]:
    """An agent process trusting a simulated hub's keyring and serving version 1 of the model."""
    sim = HubSimulator(fleet=fleet)
    dev = Device(sim, broker, procs, tmp)
    if config_extra:
        dev.config.write_text(dev.config.read_text() + config_extra)
    dev.publish(dev.topics.keyring, sim.keyring())
    dev.deploy(1)
    dev.start()
    dev.wait_serving({1}, 1)
    try:
        yield dev
    finally:
        sim.server.close()


@pytest.fixture
def device(broker: Broker, procs: Procs, fleet: str, tmp_path: Path) -> Iterator[Device]:
    with serving_device(broker, procs, fleet, tmp_path) as dev:
        yield dev


def test_kill_at_every_step_serves_old_or_new(device: Device) -> None:
    old = 1
    for new, step in enumerate(STEPS, start=2):
        assert device.proc is not None
        device.proc.send_signal(signal.SIGTERM)
        device.proc.wait(10)
        device.deploy(new)
        for _ in range(2):  # killed twice at the same step: the update resumes each time
            device.start(pause_at=step)
            device.kill_when_paused(step)
            doc = device.check_disk()
            assert doc["update"] is not None and doc["update"]["seq"] == device.sim.seq
        device.start()
        device.wait_serving({old, new}, new)
        wait_for(lambda: device.check_disk()["update"] is None, 10, "the commit to reach the disk")
        assert device.check_disk()["last_seq"] == device.sim.seq
        old = new


def test_crash_loop_keeps_the_previous_model(device: Device) -> None:
    assert device.proc is not None
    device.proc.send_signal(signal.SIGTERM)
    device.proc.wait(10)
    device.deploy(2)
    for _ in range(4):  # the first attempt and three restarts all die at "guard"
        device.start(pause_at="guard")
        device.kill_when_paused("guard")
    device.start()
    device.wait_serving({1}, 1)
    doc = device.check_disk()
    wait_for(lambda: device.check_disk()["failed"], 10, "the failure to be recorded")
    doc = device.check_disk()
    assert doc["failed"]["reason"] == "crash_loop"  # type: ignore[index]
    assert doc["update"] is None and doc["last_seq"] == 1
    device.deploy(3)  # a new state (higher seq) is tried again and goes through
    device.wait_serving({1, 3}, 3)


@pytest.mark.parametrize("steps", [STEPS[:3], STEPS[3:]], ids=["download-verify-guard", "stage-switch-commit"])
@pytest.mark.parametrize("before", ["nothing", "fallback-only"])
def test_a_kill_at_any_step_of_a_first_install_still_installs(
    broker: Broker, procs: Procs, fleet: str, tmp_path: Path, before: str, steps: tuple[str, ...]
) -> None:
    """Killed during the first install of a model (nothing installed, or a state file holding only a
    fallback for it), the agent installs and serves it once it runs uninterrupted. Three kills: one
    fewer than the restarts after which an update is abandoned as a crash loop."""
    sim = HubSimulator(fleet=fleet)
    dev = Device(sim, broker, procs, tmp_path)
    try:
        dev.publish(dev.topics.keyring, sim.keyring())
        allowed = {2}
        if before == "fallback-only":
            dev.deploy(1)
            dev.start()
            dev.wait_serving({1}, 1)
            assert dev.proc is not None
            dev.proc.send_signal(signal.SIGTERM)
            dev.proc.wait(10)
            doc = dev.check_disk()
            rec = doc["models"]["m"]  # type: ignore[index]
            rec["entry"], rec["fallback"] = None, rec["entry"]
            (dev.state / "state.json").write_text(json.dumps(doc))
            allowed = {1, 2}
        dev.deploy(2)
        for step in steps:
            dev.start(pause_at=step)
            dev.kill_when_paused(step)
            doc = dev.check_disk()
            assert doc["update"] is not None and doc["failed"] is None
        dev.start()
        dev.wait_serving(allowed, 2)
        # Version 2 answers from the switch on; the commit's write follows a moment later.
        wait_for(lambda: dev.check_disk()["update"] is None, 10, "the commit to reach the disk")
        assert dev.check_disk()["last_seq"] == sim.seq
    finally:
        sim.server.close()


def test_the_agent_runs_in_an_empty_working_directory(device: Device) -> None:
    """ONNX Runtime resolves relative external-data paths of a model opened from bytes against the
    working directory: the agent's is an empty folder of its own, not systemd's default '/'."""
    assert device.proc is not None
    cwd = Path(os.readlink(f"/proc/{device.proc.pid}/cwd"))
    assert cwd == device.state / "empty"
    assert list(cwd.iterdir()) == []
