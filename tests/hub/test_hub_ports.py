"""The hub's services and adapters see the rest of the hub through ports (``Protocol`` classes such
as ``rollout_manager.DesiredStates`` and ``api.Admin``, or plain arguments), never through the
daemon's ``Hub`` or the command line: no module under hub/services or hub/adapters imports
``edgefleet.hub.daemon`` or ``edgefleet.hub.cli``, not even under ``if TYPE_CHECKING:`` or inside a
function. Checked on the source with ``ast``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._imports import import_targets, module_name
from tests.conftest import REPO

HUB = REPO / "hub"
LAYERS = ("services", "adapters")
FORBIDDEN = ("edgefleet.hub.daemon", "edgefleet.hub.cli")


def _forbidden(target: str) -> bool:
    return any(target == f or target.startswith(f + ".") for f in FORBIDDEN)


def import_offences(path: Path, module: str, name: str) -> list[str]:
    """``name:line: what`` for every import of the daemon or the CLI in the file, at any depth
    (``if TYPE_CHECKING:`` blocks and function bodies included), relative imports resolved
    against *module*, and ``importlib.import_module``/``__import__`` of such a name."""
    by_line: dict[int, set[str]] = {}
    for line, target in import_targets(path, module, type_checking=True, dynamic=True):
        if _forbidden(target):
            by_line.setdefault(line, set()).add(target)
    return [f"{name}:{line}: imports {sorted(bad)[0]} (depend on a port: a Protocol or plain "
            "arguments that edgefleet.hub.daemon.Hub provides)" for line, bad in sorted(by_line.items())]


def _layer_modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (HUB / layer).rglob("*.py"))


def test_services_and_adapters_import_neither_the_daemon_nor_the_cli() -> None:
    modules = _layer_modules()
    assert len(modules) > 15  # the walk found the layers
    offences = [o for p in modules for o in import_offences(p, module_name("edgefleet.hub", HUB, p), str(p.relative_to(REPO)))]
    assert not offences, "hub/services and hub/adapters must not reach the daemon or the CLI:\n  " + "\n  ".join(offences)


@pytest.mark.parametrize(("source", "line"), [
    ("from edgefleet.hub.daemon import Hub\n", 1),
    ("import edgefleet.hub.cli.main as m\n", 1),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgefleet.hub.daemon import Hub\n", 3),
    ("def f():\n    from edgefleet.hub import daemon\n", 2),
    ("from .. import daemon\n", 1),
    ("from ..cli import commands\n", 1),
    ("import importlib\nimportlib.import_module('edgefleet.hub.daemon')\n", 2),
])
def test_the_check_finds_every_form_of_import(tmp_path: Path, source: str, line: int) -> None:
    src = tmp_path / "probe.py"
    src.write_text(source)
    got = import_offences(src, "edgefleet.hub.services.probe", "hub/services/probe.py")
    assert len(got) == 1 and got[0].startswith(f"hub/services/probe.py:{line}: imports edgefleet.hub."), got


def test_the_check_lets_the_ports_modules_be(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text("from edgefleet.hub.db import Database\nfrom ..adapters.home import HubHome\n"
                   "from edgefleet.hub.services.rollout_manager import DesiredStates\nimport edgefleet.hub.daemonish\n")
    assert import_offences(src, "edgefleet.hub.services.probe", "hub/services/probe.py") == []
