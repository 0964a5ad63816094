"""The hub's services and adapters see the rest of the hub through ports (``Protocol`` classes such
as ``rollout_manager.DesiredStates`` and ``api.Admin``, or plain arguments), never through the
daemon's ``Hub`` or the command line: no module under hub/services or hub/adapters imports
``edgefleet.hub.daemon`` or ``edgefleet.hub.cli``, not even under ``if TYPE_CHECKING:`` or inside a
function. Checked on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

HUB = REPO / "hub"
LAYERS = ("services", "adapters")
FORBIDDEN = ("edgefleet.hub.daemon", "edgefleet.hub.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(HUB).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("edgefleet.hub", *parts))


def _forbidden(target: str) -> bool:
    return any(target == f or target.startswith(f + ".") for f in FORBIDDEN)


def import_offences(path: Path, module: str, name: str) -> list[str]:
    """``name:line: what`` for every import of the daemon or the CLI in the file, at any depth
    (``if TYPE_CHECKING:`` blocks and function bodies included), relative imports resolved
    against *module*, and ``importlib.import_module``/``__import__`` of such a name."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                targets = [node.args[0].value]
        bad = sorted({t for t in targets if _forbidden(t)})
        if bad:
            found.append(f"{name}:{node.lineno}: imports {bad[0]} (depend on a port: a Protocol or plain "
                         "arguments that edgefleet.hub.daemon.Hub provides)")
    return found


def _layer_modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (HUB / layer).rglob("*.py"))


def test_services_and_adapters_import_neither_the_daemon_nor_the_cli() -> None:
    modules = _layer_modules()
    assert len(modules) > 15  # the walk found the layers
    offences = [o for p in modules for o in import_offences(p, _module_name(p), str(p.relative_to(REPO)))]
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
