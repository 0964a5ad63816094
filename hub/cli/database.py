"""``edgefleet-hub db info|migrate`` and ``replica init``: what database a hub home uses, moving
it, and making the home of another hub replica.

These two open the database themselves (the only client commands that do): ``info`` reads,
``migrate`` copies a home's database into a new, empty one and points ``hub.toml`` at it, with
the hub stopped. The usual move is from the embedded SQLite file to PostgreSQL, which hub
replicas on separate hosts share (docs/scale-out.md)::

    edgefleet-hub db migrate --home HOME --to postgresql://edgefleet@db.example/edgefleet

``replica init`` writes a replica's own home from an existing one: its config (with its own
listen address), the signing key, the keyring and root public key, the tokens, the device CA and
the broker and object store credentials; never the root private key, the database or the blobs,
which the replicas share through PostgreSQL and the object store. Copy the folder to the
replica's host over a secure channel (it holds the signing key and the CA key: ``chmod -R go=``).
"""

from __future__ import annotations

import argparse
import shutil
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


# What a replica home leaves out: the shared state (database, blobs), this process's run file and
# locks, and the root private key (offline; the hub never needs it to run).
_NOT_COPIED = {"hub.db", "hub.db-wal", "hub.db-shm", "blobs", "hub.run.json", "root.pem"}


def cmd_replica_init(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    cfg = home.config()
    if not cfg.db.startswith("postgres"):
        raise ConfigError(f"{home.path} keeps its database in its own folder ({redact_url(home.db_url)}): replicas "
                          "share one PostgreSQL; move it first with `edgefleet-hub db migrate --to postgresql://...`")
    if not cfg.blob_store:
        raise ConfigError(f"{home.path} keeps its blobs in {home.blobs}: replicas share an object store; set "
                          "blob_store = \"s3://BUCKET/PREFIX\" (with s3_endpoint, s3_credentials_file) in hub.toml")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose a new folder for the replica's home")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.chmod(0o700)
    copied = []
    for src in sorted(home.path.rglob("*")):
        rel = src.relative_to(home.path)
        if rel.parts[0] in _NOT_COPIED or src.name in _NOT_COPIED or src.name.endswith(".lock") or src.is_dir():
            continue
        dst = out / rel
        dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        dst.chmod(0o600)
        copied.append(str(rel))
    replica = HubHome(out)
    changes = {k: v for k, v in (("http_listen", args.http), ("public_url", args.public_url)) if v}
    if changes:
        replica.update_config(**changes)
    replica.blobs.mkdir(mode=0o700, exist_ok=True)
    emit(args, {"home": str(out), "copied": copied},
         f"replica home ready in {out} ({len(copied)} files; no root key, database or blobs)\n"
         f"copy it to the replica's host (it holds the signing key), then: edgefleet-hub serve --home {out} "
         "--replica NAME --share edgefleet-hub")
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
    group = sub.add_parser("replica", help="hub replicas: the home of another one").add_subparsers(
        dest="replica_command", required=True)
    sp = cmd("init", cmd_replica_init, "write another replica's home from this one (--home): config, signing key, "
             "keyring, tokens, CA, credentials; no root key, database or blobs", group)
    sp.add_argument("--out", required=True, help="the new replica's home folder (new or empty)")
    sp.add_argument("--http", help="its HTTP listen address HOST:PORT (default: the same as this home's)")
    sp.add_argument("--public-url", help="the URL agents reach the replicas at (a load balancer in front of them)")
    sp.add_argument("--json", action="store_true")
