"""A device installs only the base dependencies: no agent module may pull in the hub,
skl2onnx or scikit-learn. Checked in a fresh interpreter, importing every module of `agent`."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from edgefleet import agent
from tests.conftest import REPO

FORBIDDEN = ("hub", "skl2onnx", "sklearn", "amqtt")


def test_importing_every_agent_module_loads_no_hub_code() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "edgefleet.agent."))
    assert "edgefleet.agent.app.daemon" in modules and "edgefleet.agent.contract.wire" in modules
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r} or k.startswith('edgefleet.hub'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout) == []


def test_the_serving_process_does_not_load_onnx() -> None:
    """onnx (~8 MiB resident) is for structural checks, which run in the guard child process."""
    code = (
        "import sys, edgefleet.agent.app.cli, edgefleet.agent.app.daemon, edgefleet.agent.app.updater, edgefleet.agent.adapters.modelcheck\n"
        "print('onnx' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_the_serving_process_verifies_signatures_without_loading_cryptography() -> None:
    """cryptography carries its own OpenSSL (~6.5 MiB resident); the agent verifies Ed25519
    through the libcrypto the interpreter already has mapped (agent.ed25519)."""
    code = (
        "import sys, edgefleet.agent.app.cli, edgefleet.agent.app.daemon, edgefleet.agent.app.updater, edgefleet.agent.core.trust, edgefleet.agent.contract.ed25519\n"
        "print(edgefleet.agent.contract.ed25519.BACKEND, any(m.split('.')[0] == 'cryptography' for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    expected = "libcrypto False" if sys.platform == "linux" else "cryptography True"
    assert out.stdout.strip() == expected
