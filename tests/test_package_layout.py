"""The installed shape of the package: one import name per module, no import cycles.

The repository keeps ``agent/`` and ``hub/``; they install as ``edgefleet.agent`` and
``edgefleet.hub`` (pyproject's ``package-dir``). These tests hold that line from inside a checkout,
where ``agent`` would otherwise be importable too, because the checkout's root is on ``sys.path``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._imports import import_targets, module_name
from tests.conftest import REPO

PACKAGES = {"edgefleet.agent": REPO / "agent", "edgefleet.hub": REPO / "hub"}


def _modules() -> dict[str, Path]:
    return {module_name(name, root, path): path for name, root in PACKAGES.items()
            for path in sorted(root.rglob("*.py"))}


@pytest.mark.parametrize("short", ["agent", "hub", "agent.contract.wire", "hub.cli"])
def test_the_folder_names_are_not_import_names_even_inside_the_checkout(short: str) -> None:
    res = subprocess.run([sys.executable, "-c", f"import {short}"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0
    assert "import it as edgefleet." in res.stderr


def test_every_module_loads_once_under_its_edgefleet_name() -> None:
    modules = sorted(_modules())
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "files = {}\n"
        "for k, m in list(sys.modules.items()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f and f.startswith((sys.argv[1], sys.argv[2])):\n"
        "        files.setdefault(f, []).append(k)\n"
        "print(json.dumps({'short': sorted(k for k in sys.modules if k.split('.')[0] in ('agent', 'hub')),\n"
        "                  'twice': {f: ks for f, ks in files.items() if len(ks) > 1}}))\n"
    )
    # Only our two package folders: a venv inside the checkout holds extension modules that
    # register under several names (onnxruntime's), which is none of our business.
    roots = [str(REPO / "agent") + "/", str(REPO / "hub") + "/"]
    res = subprocess.run([sys.executable, "-c", code, *roots], cwd=REPO, capture_output=True, text=True, check=True)
    got = json.loads(res.stdout)
    assert got == {"short": [], "twice": {}}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """edgefleet modules *name* imports at run time, at module level or inside functions (a lazy
    cycle is still a cycle a reader has to untangle). ``if TYPE_CHECKING:`` blocks are annotations
    only and are left out."""
    found: set[str] = set()
    for _, target in import_targets(path, name, type_checking=False):
        t = target
        while t and t not in known:
            t = t.rpartition(".")[0]
        if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
            found.add(t)
    return found


def test_no_import_cycle_inside_either_package() -> None:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n):], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_agent_never_imports_the_hub_in_source() -> None:
    modules = _modules()
    known = set(modules)
    offenders = {m: sorted(i for i in _imports(m, p, known) if i.startswith("edgefleet.hub"))
                 for m, p in modules.items() if m.startswith("edgefleet.agent")}
    assert {m: v for m, v in offenders.items() if v} == {}


# The pure core (docs/architecture.md, "Layout"): every module in agent/contract/, agent/core/ and
# hub/core/. No sockets, threads, processes or clock, directly or through the edgefleet modules it
# imports. Time comes in as an argument.
PURE = sorted(m for m in _modules() if m.split(".")[2:3] and m.split(".")[2] in ("contract", "core")
              and m.split(".")[1] in ("agent", "hub") and not m.startswith("edgefleet.hub.contract"))
IMPURE = {"socket", "ssl", "threading", "_thread", "time", "subprocess", "multiprocessing", "asyncio",
          "selectors", "http", "urllib.request", "paho", "httpx", "onnxruntime", "sqlite3", "queue"}


def _stdlib_and_third_party(module: str, path: Path) -> set[str]:
    return {t for _, t in import_targets(path, module) if not t.startswith("edgefleet")}


@pytest.mark.parametrize("module", PURE)
def test_core_modules_import_no_socket_thread_or_clock(module: str) -> None:
    modules = _modules()
    known = set(modules)
    seen: set[str] = set()
    todo = [module]
    bad: dict[str, list[str]] = {}
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        hits = sorted(i for i in _stdlib_and_third_party(m, modules[m])
                      if i in IMPURE or i.split(".")[0] in IMPURE)
        if hits:
            bad[m] = hits
        todo.extend(_imports(m, modules[m], known))
    assert bad == {}


def _layer(module: str) -> str:
    """``edgefleet.agent.core.trust`` -> ``agent.core``; ``edgefleet.hub.db`` -> ``hub.db``."""
    parts = module.split(".")[1:]
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


# Which layers each layer may import at run time. The listing is the architecture: a module's folder
# says what it may depend on (docs/architecture.md, "Layout").
ALLOWED = {
    "agent.contract": {"agent", "agent.contract"},
    "agent.core": {"agent.contract", "agent.core"},
    "agent.adapters": {"agent", "agent.contract", "agent.core", "agent.adapters"},
    "agent.app": {"agent", "agent.contract", "agent.core", "agent.adapters", "agent.app"},
    "hub.errors": {"agent.contract"},
    "hub.core": {"agent.contract", "hub.errors", "hub.core"},
    "hub.db": {"agent.contract", "hub.errors", "hub.core"},
    "hub.adapters": {"agent", "agent.contract", "agent.core", "agent.adapters", "hub.errors", "hub.core",
                     "hub.db", "hub.adapters", "hub.services"},
    "hub.services": {"agent.contract", "agent.core", "agent.adapters", "hub.errors", "hub.core", "hub.db",
                     "hub.adapters", "hub.services"},
}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    modules = _modules()
    known = set(modules)
    bad: dict[str, list[str]] = {}
    for m, p in modules.items():
        allowed = ALLOWED.get(_layer(m))
        if allowed is None:
            continue  # agent.app, hub.daemon and hub.cli wire everything together
        wrong = sorted(i for i in _imports(m, p, known) if _layer(i) not in allowed and _layer(i) != _layer(m))
        if wrong:
            bad[m] = wrong
    assert bad == {}


def test_only_the_demo_runs_the_agent_application_inside_the_hub() -> None:
    modules = _modules()
    known = set(modules)
    users = sorted(m for m, p in modules.items() if m.startswith("edgefleet.hub")
                   and any(i.startswith("edgefleet.agent.app") for i in _imports(m, p, known)))
    assert users == ["edgefleet.hub.cli.demo"]


def test_the_core_tests_exercise_only_the_pure_core() -> None:
    """tests/core/ runs in milliseconds because it touches nothing but contract/ and core/ modules
    (and the stdlib, pytest, numpy and cryptography to build inputs)."""
    pure, known = set(PURE), set(_modules())
    bad: dict[str, list[str]] = {}

    def module(target: str) -> str:  # ``from m import Name`` also yields ``m.Name``: back to ``m``
        t = target
        while t.startswith("edgefleet.") and t not in known:
            t = t.rpartition(".")[0]
        return "tests._signing" if t.startswith("tests._signing.") else t

    for path in sorted((REPO / "tests" / "core").glob("test_*.py")):
        mods = {module(t) for _, t in import_targets(path, f"tests.core.{path.stem}")}
        wrong = sorted(m for m in mods if (m.startswith("edgefleet.") and m not in pure)
                       or m.split(".")[0] in IMPURE or (m.startswith("tests.") and m != "tests._signing"))
        if wrong:
            bad[path.name] = wrong
    assert bad == {}


def test_every_package_folder_ships_in_the_wheel() -> None:
    """pyproject lists its packages by name: a new subpackage left out would be silently missing
    from the wheel (an editable install would not notice)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert folders - listed == set()
