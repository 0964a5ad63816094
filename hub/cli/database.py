"""``edgefleet-hub db info|migrate``: what database a hub home uses, and moving it.

These two open the database themselves (the only client commands that do): ``info`` reads,
``migrate`` copies a home's database into a new, empty one and points ``hub.toml`` at it, with
the hub stopped. The usual move is from the embedded SQLite file to PostgreSQL, which hub
replicas on separate hosts share (docs/scale-out.md)::

    edgefleet-hub db migrate --home HOME --to postgresql://edgefleet@db.example/edgefleet
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.cli.commands import emit, progress
from edgefleet.hub.db import Database, db_url, redact_url

__all__ = ["add_db_commands"]


def cmd_info(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    db = Database(home.db_url)
    try:
        counts = db.table_counts()
        res = {"url": redact_url(db.url), "engine": db.engine, "schema_version": db.schema_version(), "rows": counts}
    finally:
        db.close()
    lines = [f"{res['url']} ({res['engine']}, schema version {res['schema_version']})"]
    lines += [f"  {t:24} {n:>10}" for t, n in counts.items()]
    emit(args, res, "\n".join(lines))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    target = db_url(args.to)
    source_url = home.db_url
    if target == source_url:
        raise ConfigError(f"{redact_url(target)} is already this home's database")
    running = home.running_hub()
    if running:
        raise ConfigError(f"the hub of {home.path} is running ({running}): stop it first, so that nothing is "
                          "written to the old database after the copy")
    src = Database(source_url)
    try:
        dst = Database(target)
        try:
            progress(f"copying {redact_url(source_url)} into {redact_url(target)}")
            copied = src.copy_to(dst, on_table=lambda t, n: progress(f"  {t}: {n} rows"))
            problems = dst.verify_audit()
            if problems:  # cannot happen unless the copy is wrong: then do not switch
                raise ConfigError(f"the copied audit log does not verify: {problems[0]}")
        finally:
            dst.close()
    finally:
        src.close()
    home.update_config(db=args.to)
    emit(args, {"from": redact_url(source_url), "to": redact_url(target), "rows": copied},
         f"copied {sum(copied.values())} rows; {home.config_path} now uses {redact_url(target)}\n"
         f"the old database is left as it was ({redact_url(source_url)}); start the hub: "
         f"edgefleet-hub serve --home {home.path}")
    return 0


def add_db_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    group = sub.add_parser("db", help="the hub's database: info, migrate to PostgreSQL").add_subparsers(
        dest="db_command", required=True)
    sp = cmd("info", cmd_info, "the database this home uses: engine, schema version, rows per table", group)
    sp.add_argument("--json", action="store_true")
    sp = cmd("migrate", cmd_migrate, "copy this home's database into a new, empty one and switch hub.toml to it "
             "(the hub must be stopped)", group)
    sp.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST[:PORT]/DB (or sqlite:///PATH)")
    sp.add_argument("--json", action="store_true")
