"""What a source file imports, read with ``ast`` (nothing is imported): the layout tests'
one walker (tests/test_package_layout.py, tests/hub/test_hub_ports.py)."""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(package: str, root: Path, path: Path) -> str:
    """``edgefleet.hub`` + ``hub/services/keys.py`` -> ``edgefleet.hub.services.keys``."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def import_targets(path: Path, module: str, *, type_checking: bool = True,
                   dynamic: bool = False) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in the file, at any depth (function bodies
    included), relative imports resolved against *module*; ``from a import b`` yields both ``a``
    and ``a.b``. ``type_checking=False`` leaves out ``if TYPE_CHECKING:`` blocks (annotations only,
    never run); ``dynamic=True`` adds ``importlib.import_module``/``__import__`` of a literal name."""
    tree = ast.parse(path.read_text(), str(path))
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base), *((node.lineno, f"{base}.{a.name}") for a in node.names)]
        elif dynamic and isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found
