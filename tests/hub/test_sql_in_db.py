"""hub/db.py is the one module of edgefleet.hub that talks SQL: no other module holds SQL text or
calls ``execute``/``executemany``/``executescript``. Checked on the source with ``ast``, so a
statement in a function no test runs is found too.

SQL text is a string literal (a plain string, an f-string, or a ``+`` of strings and names) that
starts, after whitespace and in any case, with SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, WITH
or PRAGMA *followed by what that statement needs next* (``SELECT`` a column list, ``INSERT INTO``,
``UPDATE t SET``, ``DELETE FROM``, ``CREATE TABLE``/``INDEX``..., ``ALTER TABLE``, ``WITH n AS (``,
``PRAGMA name``): the hub's prose ("create a hub home: keys, database, ...", "Update ...") is not SQL.
Docstrings are prose and are skipped.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

HUB = REPO / "hub"
ALLOWED = HUB / "db.py"
EXECUTE = {"execute", "executemany", "executescript"}
SQL = re.compile(
    r"""\s*(
        SELECT\s+(\*|DISTINCT\b|ALL\b|\d|[\w.]+\s*(\(|,|\bAS\b|\bFROM\b|$))
      | INSERT\s+(OR\s+\w+\s+)?INTO\b
      | UPDATE\s+(OR\s+\w+\s+)?[\w."]+\s+SET\b
      | DELETE\s+FROM\b
      | CREATE\s+((TEMP|TEMPORARY|UNIQUE|VIRTUAL)\s+)?(TABLE|INDEX|VIEW|TRIGGER)\b
      | ALTER\s+TABLE\b
      | WITH\s+(RECURSIVE\s+)?\w+\s*(\([^)]*\)\s*)?AS\s*((NOT\s+)?MATERIALIZED\s*)?\(
      | PRAGMA\s+[\w.]+
    )""",
    re.IGNORECASE | re.VERBOSE,
)


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes (module, class, function): prose, not statements."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                out.add(id(body[0].value))
    return out


def _text(node: ast.AST) -> str | None:
    """The text of a string expression, with ``x`` for each interpolated part; None if *node* is
    not a string, an f-string or a ``+`` that starts with one."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "x"
                       for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _text(node.left)
        if left is None:
            return None
        return left + (_text(node.right) or "x")
    return None


def sql_offences(path: Path, name: str) -> list[str]:
    """``name:line: what`` for every SQL string and ``execute`` call in the file, by line."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    found: dict[tuple[int, str], str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EXECUTE:
            found[(node.lineno, "call")] = (f"{name}:{node.lineno}: call to .{node.func.attr}() "
                                            "(only hub/db.py runs statements)")
        if id(node) in docs or not isinstance(node, ast.Constant | ast.JoinedStr | ast.BinOp):
            continue
        text = _text(node)
        if text is not None and SQL.match(text):
            first = " ".join(text.split())[:60]
            # the outermost string expression of a line is reported (a + b is found before its a)
            found.setdefault((node.lineno, "sql"), f"{name}:{node.lineno}: SQL text {first!r} "
                                                   "(make it a method of hub/db.py's Database)")
    return [found[k] for k in sorted(found)]


def test_only_hub_db_holds_sql() -> None:
    modules = sorted(p for p in HUB.rglob("*.py") if p != ALLOWED)
    assert len(modules) > 20  # the walk found the package
    offences = [o for p in modules for o in sql_offences(p, str(p.relative_to(REPO)))]
    assert not offences, "SQL outside hub/db.py:\n  " + "\n  ".join(offences)


def test_the_check_finds_sql_text_and_execute_calls(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text(
        '"""Select the rows: a docstring is prose."""\n'
        "def f(conn, t, cols):\n"
        '    """With a docstring; UPDATE devices SET x in a docstring is prose too."""\n'
        '    conn.execute("select 1")\n'
        '    q = ("  INSERT INTO x "\n'
        '         "VALUES (?)")\n'
        '    g = f"UPDATE {t} SET a=1"\n'
        "    conn.executemany(q, [])\n"
        '    h = "SELECT " + cols + " FROM t"\n'
        '    w = "with recent AS (select 1) select * from recent"\n'
        '    return "Updated 3 devices", "selected", "create a hub home: keys, database", "Select a device", g, h, w\n'
    )
    got = sql_offences(src, "hub/probe.py")
    assert [o.split(":", 2)[1] for o in got] == ["4", "4", "5", "7", "8", "9", "10"], got
    assert got[0] == "hub/probe.py:4: call to .execute() (only hub/db.py runs statements)"
    assert got[1].startswith("hub/probe.py:4: SQL text 'select 1'")
    assert got[2].startswith("hub/probe.py:5: SQL text 'INSERT INTO x VALUES (?)'")
    assert got[3].startswith("hub/probe.py:7: SQL text 'UPDATE x SET a=1'")
    assert got[4].startswith("hub/probe.py:8: call to .executemany()")
    assert got[5].startswith("hub/probe.py:9: SQL text 'SELECT x FROM t'")
