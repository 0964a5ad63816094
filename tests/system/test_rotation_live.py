"""Key rotation over the real wire: a running agent (process, real Mosquitto) follows a root
rotation and a signing-key rotation published as retained messages, in the unlucky order
(keyring before its root), and still trusts the new root after a restart without the chain."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker, Procs
from tests.system.test_crash_safety import Device, serving_device

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def device(broker: Broker, procs: Procs, fleet: str, tmp_path: Path) -> Iterator[Device]:
    with serving_device(broker, procs, fleet, tmp_path) as dev:
        yield dev


def test_agent_follows_root_and_signing_rotation(device: Device) -> None:
    sim = device.sim
    sim.rotate_root()
    sim.rotate_signing(revoke_old=True)
    device.publish(device.topics.keyring, sim.keyring())  # signed by root 2, not yet trusted
    device.publish(device.topics.roots, sim.roots())
    device.deploy(2)  # signed by the new signing key
    device.wait_serving({1, 2}, 2)

    assert device.proc is not None
    device.proc.send_signal(signal.SIGTERM)
    device.proc.wait(10)
    device.publish(device.topics.roots, b"")  # the broker forgets the chain
    device.start()
    device.wait_serving({2}, 2)
    device.deploy(3)
    device.wait_serving({2, 3}, 3)
    assert device.check_disk()["roots"] == [sim.chain[0].decode()]
