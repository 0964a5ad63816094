"""``edgefleet-hub token add|list|revoke``: named admin API tokens with a role (viewer, operator,
admin; :mod:`hub.core.access`). Like every client command they go through the admin API, with an
admin token; the hub keeps only each token's sha256, so ``add`` prints the token once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.hub.adapters.client import TOKEN_ENV, HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.cli.commands import emit, safe
from edgefleet.hub.core.access import ROLES

__all__ = ["add_token_commands"]


def _client(args: argparse.Namespace) -> HubClient:
    return HubClient.for_home(HubHome(Path(args.home)), args.hub)


def cmd_add(args: argparse.Namespace) -> int:
    res = _client(args).add_token(args.name, args.role)
    emit(args, res,
         f"token {res['name']} (role {res['role']}), shown this once; the hub keeps only its sha256:\n"
         f"{res['token']}\n"
         f"use it from any machine: {TOKEN_ENV}=<token> edgefleet-hub status --hub URL")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    tokens = _client(args).tokens()
    lines = [f"{'NAME':20} {'ROLE':9} {'CREATED':22} {'BY':24} REVOKED"]
    lines += [f"{safe(t['name']):20} {safe(t['role']):9} {t['created_at']:22} {safe(t['created_by'] or '-'):24} "
              f"{t['revoked_at'] or '-'}" for t in tokens]
    emit(args, {"tokens": tokens}, "\n".join(lines) if tokens else "no tokens")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    res = _client(args).revoke_token(args.name)
    emit(args, res, f"token {res['name']} (role {res['role']}) revoked at {res['revoked_at']}: "
                    "the hub refuses it from its next request")
    return 0


def add_token_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser],
                       client: Callable[[argparse.ArgumentParser], None]) -> None:
    tok = sub.add_parser("token", help="named admin API tokens: add, list, revoke")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    sp = cmd("add", cmd_add, "make a named token with a role; prints it once", tsub)
    client(sp)
    sp.add_argument("name", help="who the token is: the actor of its audit entries (1-64 of A-Z a-z 0-9 _ . -)")
    sp.add_argument("--role", required=True, choices=ROLES,
                    help="viewer: read only; operator: + publish, deploy, rollouts, rollback; "
                         "admin: + devices and tokens")
    client(cmd("list", cmd_list, "every token: name, role, when made and by whom, revoked", tsub))
    sp = cmd("revoke", cmd_revoke, "revoke a token: the hub refuses it from then on", tsub)
    client(sp)
    sp.add_argument("name")
