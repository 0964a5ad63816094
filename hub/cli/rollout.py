"""``edgefleet-hub rollout {start,status,pause,resume,abort,promote}`` and ``edgefleet-hub rollback``.

Like every client command they talk to the running hub over its admin API. The policy file is
read and validated here, on the operator's machine, so a bad file is refused before anything is
sent (the hub validates again).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.cli.commands import emit, safe
from edgefleet.hub.cli.progress import watch_rollout
from edgefleet.hub.core.rollout import MODES, Policy, load_policy, parse_steps
from edgefleet.hub.errors import BadRequest

__all__ = ["add_rollout_commands", "format_rollout"]


def _client(args: argparse.Namespace) -> HubClient:
    return HubClient.for_home(HubHome(Path(args.home)), args.hub)


def format_rollout(r: dict[str, Any]) -> str:
    lines = [f"{safe(r['id'])}  {safe(r['model'])} {safe(r['from_version'])} -> {safe(r['to_version'])}  "
             f"{safe(r['state'].upper())}  "
             f"step {r['step_number']}/{len(r['steps'])} ({r['percent']} %)  cohort {r['cohort_size']} of "
             f"{r['target_count']} device(s)  mode {r['mode']} fraction {r['fraction']}  since {r['step_started']}"]
    if r.get("reason"):
        lines.append(f"  last: {safe(r['reason'])}")  # may quote a device's event
    d = r.get("decision")
    if d:
        ev = d["evidence"]
        lines.append(f"  evidence: {ev['requests']} candidate requests, {ev['compared']} compared, "
                     f"{ev['windows']} windows from {ev['devices']} device(s)")
        for g in d["gates"]:
            value = "-" if g["value"] is None else f"{g['value']:.4g}"
            mark = "ok  " if g["passed"] else ("FAIL" if g["value"] is not None else "n/a ")
            dry = " (dry-run)" if g["dry_run"] else ""
            lines.append(f"  {mark} {safe(g['name']):18} {value:>10} vs {safe(g['threshold']):<8} "
                         f"{safe(g['detail'])}{dry}")
        lines.append(f"  gate now: {safe(d['outcome'])} — {safe(d['reason'])}")
        needs = d.get("needs") or {}
        if needs:
            more = ", ".join(f"{v:,.0f} more {k}" for k, v in sorted(needs.items()))
            eta = d.get("eta_seconds")
            when = f" (about {eta / 60:.1f} min at this step's rate)" if isinstance(eta, int | float) else ""
            lines.append(f"  to decide: {safe(more)}{when}")
    return "\n".join(lines)


def cmd_start(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.name, "version": args.version,
                            "steps": list(parse_steps(args.steps)),
                            "mode": args.mode, "fraction": args.fraction, "dry_run": args.dry_run}
    if args.policy:
        load_policy(Path(args.policy))  # refuse a bad file with the file's name in the message
        body["policy"] = tomllib.loads(Path(args.policy).read_text(encoding="utf-8"))
    if args.devices:
        body["devices"] = [d for item in args.devices for d in item.split(",") if d]
    client = _client(args)
    r = client.rollout_start(body)
    if args.watch:
        return watch_rollout(client, r["id"], format_rollout, timeout=args.timeout, interval=args.interval,
                             json_lines=args.json)
    emit(args, r, f"started {format_rollout(r)}\n  cohort: {safe(', '.join(r['members']))}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.watch:
        if not args.rollout:
            raise BadRequest("--watch follows one rollout: name it (rollout id or model name)")
        return watch_rollout(client, args.rollout, format_rollout, timeout=args.timeout, interval=args.interval,
                             json_lines=args.json)
    rs = client.rollouts(args.rollout)
    emit(args, {"rollouts": rs}, "\n".join(format_rollout(r) for r in rs) or "no rollouts")
    return 0


def _watch_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--watch", action="store_true",
                    help="redraw steps, evidence and the estimate until a decision (exit 0 promoted, "
                         "1 rolled back or aborted, 2 at --timeout); with --json one JSON line per change")
    sp.add_argument("--timeout", type=float, default=None, help="--watch: give up after this many seconds")
    sp.add_argument("--interval", type=float, default=1.0, help="--watch: seconds between looks (1)")


def _action(action: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        r = _client(args).rollout_action(action, args.rollout, args.reason or "")
        emit(args, r, format_rollout(r))
        return 0

    return run


def cmd_rollback(args: argparse.Namespace) -> int:
    res = _client(args).rollback(args.name, args.to)
    lines = [f"rolled back {safe(args.name)}" + (f" (rollout {safe(res['rollout'])})" if res.get("rollout") else "")
             + ":"]
    lines += [f"  {safe(d)}: {safe(c.get('from', '?'))} -> {safe(c['to'])} seq {c['seq']}"
              for d, c in sorted(res["devices"].items())]
    lines += [f"  {safe(d)}: skipped, {safe(why)}" for d, why in sorted(res["skipped"].items())]
    emit(args, res, "\n".join(lines))
    return 0


def _policy_help() -> str:
    return "gate policy TOML (keys: " + ", ".join(sorted(Policy().to_dict())) + "; see docs/rollouts.md)"


def add_rollout_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    def client(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--hub", help="admin API URL (default: the hub serving from --home)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    ro = sub.add_parser("rollout", help="staged rollouts: start, status, pause, resume, abort, promote")
    rsub = ro.add_subparsers(dest="rollout_command", required=True)
    sp = client(cmd("start", cmd_start, "start a staged rollout of a model version", rsub))
    sp.add_argument("name", help="model name")
    sp.add_argument("version", help="the version to roll out (the candidate)")
    sp.add_argument("--steps", default="5,25,100", help="cohort percentages per step (default 5,25,100)")
    sp.add_argument("--mode", choices=MODES, default="shadow", help="shadow (compare, default) or split (serve)")
    sp.add_argument("--fraction", type=float, default=0.2,
                    help="share of requests replayed (shadow) or served (split) by the candidate (default 0.2)")
    sp.add_argument("--policy", help=_policy_help())
    sp.add_argument("--devices", action="append", help="target devices (repeatable or comma-separated; "
                                                       "default: every device running the model)")
    sp.add_argument("--dry-run", action="store_true", help="evaluate and log every gate, enforce none")
    _watch_args(sp)
    sp = client(cmd("status", cmd_status, "rollouts with progress and evidence against thresholds", rsub))
    sp.add_argument("rollout", nargs="?", help="rollout id or model name (default: the 50 newest)")
    _watch_args(sp)
    for action, help_ in (("pause", "hold a running rollout at its step"),
                          ("resume", "resume a paused rollout (the step deadline starts again)"),
                          ("abort", "stop a rollout: every target returns to the previous version"),
                          ("promote", "promote now: every target runs the new version")):
        sp = client(cmd(action, _action(action), help_, rsub))
        sp.add_argument("rollout", nargs="?", help="rollout id or model name (default: the one active rollout)")
        sp.add_argument("--reason", help="why (goes into the audit log)")
    sp = client(cmd("rollback", cmd_rollback,
                    "fleet rollback: new desired states naming the previous version for every device running NAME"))
    sp.add_argument("name", help="model name")
    sp.add_argument("--to", help="the version to return to (default: each device's previous version)")

