"""``edgefleet-hub``: keys, publish, deploy, status, devices, tokens, serve, demo.

Every command but ``init``, ``serve`` and ``demo`` talks to the running hub over its admin API
(address from the hub home or ``--hub``; token from ``$EDGEFLEET_TOKEN`` or the hub home's
``admin.token``), never to the database behind the daemon's back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from edgefleet.agent import __version__
from edgefleet.agent.contract.errors import ConfigError, EdgefleetError
from edgefleet.agent.contract.wire import check_name, format_time
from edgefleet.hub.adapters import resources
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.cli.commands import (
    build_publish_request,
    cmd_status,
    emit,
    progress,
    safe,
    safe_lines,
    write_agent_bundle,
)
from edgefleet.hub.cli.progress import upload_progress, wait_for_version
from edgefleet.hub.errors import BadRequest

__all__ = ["main"]

DEFAULT_HOME = os.environ.get("EDGEFLEET_HUB_HOME", str(Path.home() / ".edgefleet" / "hub"))


def cmd_init(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    if args.db:  # reachable, and its schema created (or already current), before anything is written
        from edgefleet.hub.db import Database, db_url

        if db_url(args.db).startswith("postgres"):
            Database(args.db).close()
    home.init(fleet=args.fleet, broker_url=args.broker, http_listen=args.http, public_url=args.public_url or "",
              db=args.db or "")
    print(f"hub home ready in {home.path} (fleet {args.fleet})")
    print(f"  root key:  {home.root_key_path}  (the fleet's trust anchor: move it offline now; the hub runs")
    print(f"             on {home.root_pub_path} alone, and key ceremonies take --root-key PATH)")
    print(f"  token:     {home.token_path}  (the admin token; named ones: edgefleet-hub token add)")
    print(f"next: edgefleet-hub serve --home {home.path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edgefleet.hub.daemon import Hub, freeze_startup_heap

    hub = Hub(HubHome(Path(args.home)), broker_url=args.broker, http_listen=args.http,
              share_group=args.share, ingest_workers=args.ingest_workers, replica=args.replica)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from edgefleet.agent.adapters.sdnotify import Notifier

    notify = Notifier()
    hub.start()
    freeze_startup_heap()
    notify(f"READY=1\nSTATUS=fleet {hub.config.fleet}, admin API and blobs on {hub.public_url}")
    # systemd's watchdog sees the hub alive only while its worker threads are.
    while not stop.wait(min(1.0, notify.watchdog_interval or 1.0)):
        if all(t.is_alive() for t in hub._threads):
            notify("WATCHDOG=1")
    notify("STOPPING=1")
    hub.stop()
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    check_name(args.name, "model name")
    req = build_publish_request(args)
    progress(f"uploading {args.name} {args.version} to the hub")
    res = HubClient.for_home(home, args.hub).publish(req, on_progress=upload_progress(sys.stderr))
    note = " (already published: same bytes, nothing changed)" if res.get("already_published") else ""
    emit(args, res, f"published {res['name']} {res['version']} sha256 {res['sha256'][:16]}… "
                    f"{res['size']} bytes{note}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    folder = resources.profiles_dir(args.profiles_dir)
    names = resources.list_profiles(args.profiles_dir)
    deploy = resources.deploy_dir()
    emit(args, {"dir": str(folder), "profiles": names, "deploy_dir": str(deploy)},
         f"device profiles in {folder}:\n" + ("\n".join(f"  {n}" for n in names) or "  (none)")
         + f"\nsystemd units and broker/Prometheus/Grafana files: {deploy}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    if not args.device and not args.group:
        raise BadRequest("name the targets: --device ID and/or --group G (each repeatable)")
    for g in args.group or []:
        check_name(g, "group id")
    res = HubClient.for_home(home, args.hub).deploy(args.model, args.version, args.device or [],
                                                     args.group)
    lines = [f"deployed {safe(args.model)} {safe(args.version)}:"]
    lines += [f"  {safe(d)}: seq {v['seq']} (was {safe(v['previous'] or 'none')})" for d, v in res["devices"].items()]
    if not args.wait:
        emit(args, res, "\n".join(lines))
        return 0
    if not args.json:
        print(safe_lines("\n".join(lines)), flush=True)
    return wait_for_version(HubClient.for_home(home, args.hub), args.model, args.version, sorted(res["devices"]),
                            timeout=args.timeout, interval=args.interval, json_lines=args.json)


def cmd_events(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    evs = HubClient.for_home(home, args.hub).events(args.device, args.limit)
    # every field but the hub's own time is the device's say: one event, one line, whatever it sent
    lines = [f"{safe(e['time'])} {safe(e['device']):16} {safe(e['type']):14} {safe(e['reason'] or '-'):18} "
             f"{safe(e['message'])}" for e in evs]
    emit(args, {"events": evs}, "\n".join(lines) or "no events")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    if args.action == "show":
        return _models_show(args, HubClient.for_home(home, args.hub))
    if args.action == "diff":
        return _models_diff(args, HubClient.for_home(home, args.hub))
    if args.args:
        raise BadRequest(f"models list takes no arguments, got {args.args}")
    ms = HubClient.for_home(home, args.hub).models()
    lines = [f"{safe(m['name']):20} {safe(m['version']):12} {m['sha256'][:16]} {m['size']:>9} {m['created_at']}"
             for m in ms]
    emit(args, {"models": ms}, "\n".join(lines) or "no models")
    return 0


def _models_show(args: argparse.Namespace, client: HubClient) -> int:
    if len(args.args) != 1:
        raise BadRequest("usage: edgefleet-hub models show NAME[:VERSION]")
    name, _, version = args.args[0].partition(":")
    m = client.model(name, version or None)
    lin = m["lineage"]
    lines = [f"{safe(m['name'])} {safe(m['version'])}  sha256 {m['sha256']}  {m['size']} bytes  created "
             f"{m['created_at']}",
             f"  parent:   {safe(lin.get('parent') or '-')}",
             f"  source:   {safe(lin.get('source') or '-')}  ({safe(lin.get('converted_from') or '?')})",
             f"  author:   {safe(lin.get('author') or '-')}  published by {safe(lin.get('published_by') or '-')}",
             f"  training: sha256 {safe(lin.get('training_data_sha256') or '-')}  rows "
             f"{safe(lin.get('training_rows') or '-')}",
             "  inputs:   " + safe(", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in m["inputs"])),
             "  outputs:  " + safe(", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in m["outputs"])),
             "  metrics:  " + safe(", ".join(f"{k}={v:g}" for k, v in sorted(lin.get("metrics", {}).items())) or "-"),
             "  tags:     " + safe(", ".join(f"{k}={v}" for k, v in sorted(lin.get("tags", {}).items())) or "-")]
    ref = m.get("reference")
    if ref:
        lines.append(f"  reference: {ref.get('rows')} rows, features "
                     + safe(", ".join(f"{f['name']}({len(f['freqs'])} bins)" for f in ref["features"])))
    emit(args, m, "\n".join(lines))
    return 0


def _models_diff(args: argparse.Namespace, client: HubClient) -> int:
    if len(args.args) != 3:
        raise BadRequest("usage: edgefleet-hub models diff NAME A B")
    d = client.model_diff(*args.args)
    sig = d["signature"]
    lines = [f"{d['name']}: {d['a']} -> {d['b']}",
             f"signature: {'same' if sig['same'] else 'DIFFERENT'}"]
    if not sig["same"]:
        for side in ("a", "b"):
            lines.append(f"  {d[side]}: inputs " + ", ".join(f"{t['name']} {t['dtype']}{t['shape']}"
                         for t in sig[side]["inputs"]) + "; outputs " + ", ".join(
                         f"{t['name']} {t['dtype']}{t['shape']}" for t in sig[side]["outputs"]))
    lines.append("metrics:" if d["metrics"] else "metrics: none")
    for k, v in d["metrics"].items():
        delta = f"{v['delta']:+g}" if v["delta"] is not None else ""
        lines.append(f"  {k:24} {v['a'] if v['a'] is not None else '-'!s:>12} {v['b'] if v['b'] is not None else '-'!s:>12} {delta}")
    for k, v in d["lineage"].items():
        lines.append(f"lineage {k}: {v['a']!r} -> {v['b']!r}")
    ref = d["reference"]
    if ref["available"]:
        lines.append(f"reference PSI of {d['b']} against {d['a']} (rows {ref['rows'][0]} / {ref['rows'][1]}):")
        for f in ref["features"]:
            level = "alarm" if f["psi"] >= 0.25 else "warn" if f["psi"] >= 0.1 else "ok"
            lines.append(f"  {f['feature']:24} {f['psi']:10.4f}  {level}")
        if "output_psi" in ref:
            lines.append(f"  {'(output classes)':24} {ref['output_psi']:10.4f}")
    else:
        lines.append(f"reference: {ref['reason']}")
    emit(args, d, "\n".join(lines))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    t = HubClient.for_home(home, args.hub).trace(args.device, args.request)
    lines = [f"request {safe(t['request_id'])} on device {safe(t['device'])}"]
    for tr in t["traces"]:
        r, m, dec = tr["record"], tr["model"], tr["decision"]
        lines.append(f"  at {safe(r['time'])}: {safe(r['model'])} {safe(r['version'])} (sha256 {safe(r['sha256'][:12])})")
        lines.append("    inputs:  " + json.dumps(r["inputs"])[:400])
        lines.append("    outputs: " + json.dumps(r["outputs"])[:400])
        if m:
            lin = m["lineage"]
            lines.append(f"    model:   published {m['created_at']} by {safe(lin.get('published_by'))}, source "
                         f"{safe(lin.get('source') or '-')}, parent {safe(lin.get('parent') or '-')}")
            lines.append(f"    trained on sha256 {safe(lin.get('training_data_sha256') or '-')} "
                         f"({safe(lin.get('training_rows') or '?')} rows); metrics "
                         + safe(", ".join(f"{k}={v:g}" for k, v in sorted(lin.get("metrics", {}).items())) or "-"))
        if dec:
            lines.append(f"    put there by audit #{dec['id']} {safe(dec['action'])} at {dec['time']} by "
                         f"{safe(dec['actor'])}: " + json.dumps(dec["details"], sort_keys=True))
        else:
            lines.append("    no deploy or rollout decision found in the audit log")
    lines.append("audit chain intact" if t["audit_chain_ok"] else
                 "audit chain BROKEN: " + safe("; ".join(t["audit_problems"])))
    emit(args, t, "\n".join(lines))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    client = HubClient.for_home(home, args.hub)
    if args.action == "verify":
        res = client.audit_verify()
        emit(args, res, "audit chain intact" if res["ok"] else
             "audit chain BROKEN:\n  " + "\n  ".join(safe(p) for p in res["problems"]))
        return 0 if res["ok"] else 1
    since = None
    if args.since:
        from edgefleet.agent.contract.wire import parse_time

        since = parse_time(args.since, "--since")
    entries = client.audit(since)
    if args.action == "export":
        for e in entries:
            print(json.dumps(e, sort_keys=True))
        return 0
    lines = [f"{format_time(e['time'])} #{e['id']:<5} {safe(e['actor']):12} {safe(e['action']):16} "
             f"{json.dumps(e['details'], sort_keys=True)}" for e in entries]
    emit(args, {"entries": entries}, "\n".join(lines) or "audit log is empty")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    res = HubClient.for_home(home, args.hub).drift(args.model)
    lines = [f"{'MODEL':14} {'VERSION':10} {'SCOPE':18} {'FEATURE':12} {'ROWS':>7} {'PSI':>8} {'JS':>6} "
             f"{'KS':>6} STATE"]
    for rep in res["reports"]:
        alarm = f" (alert state: {rep['alarm_state']})" if rep.get("alarm_state") else ""
        for f in rep["features"]:
            lines.append(f"{safe(rep['model']):14} {safe(rep['version']):10} {safe(rep['scope']):18} "
                         f"{safe(f['feature']):12} {f['rows']:>7} {f['psi']:>8.4f} {f['js']:>6.3f} {f['ks']:>6.3f} "
                         f"{safe(f['state'])}")
        lines.append(f"{'':14} {'':10} {safe(rep['scope']):18} => {safe(rep['state'])}{safe(alarm)} over "
                     f"{rep['windows']} window(s) {rep['window_start']} .. {rep['window_end']}")
        lines += [f"  problem: {safe(p)}" for p in rep["problems"]]
    emit(args, res, "\n".join(lines) if res["reports"] else "no telemetry with inputs yet")
    return 0


def cmd_device_add(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    check_name(args.id, "device id")
    if args.group is not None:
        check_name(args.group, "group id")
    profile_path = resources.profile_path(args.profile, args.profiles_dir)
    from edgefleet.agent.contract.config import load_profile

    profile = load_profile(profile_path)  # refuse a broken profile before registering anything
    overrides: dict[str, Any] | None = {"telemetry": {"window_seconds": args.window}} if args.window else None
    if args.capture is not None:
        if not 0 <= args.capture <= 1:
            raise BadRequest(f"--capture is a sampling fraction from 0 to 1, got {args.capture}")
        overrides = {**(overrides or {}), "capture": {"sample_rate": args.capture}}
    from edgefleet.hub.cli.bundle import (
        install_bundle,
        staging_folder,
        write_credentials,
        write_systemd_dropin,
    )

    # All or nothing: the bundle is written into a staging folder beside --out (created before
    # the hub registers anything) and moved into place last; if that fails, this command
    # cancels the enrolment it just made (the hub takes the credentials back).
    out = Path(args.out)
    staging = staging_folder(out)
    try:
        client = HubClient.for_home(home, args.hub)
        info = client.add_device(args.id, args.profile, args.credentials, args.group)
        enrolment = info.pop("enrolment", None)
        try:
            creds = info.pop("credentials", None) or {"kind": "none"}
            if not str(info["broker_url"]).startswith("mqtts://") and not str(info["blob_url"]).startswith("https://"):
                creds.pop("ca_pem", None)  # nothing to pin on a plain-MQTT broker and plain-HTTP blobs
            staged = write_agent_bundle(staging, info, profile_path=profile_path, listen=args.listen,
                                        state_dir=args.state_dir or "state", overrides=overrides,
                                        extra_lines=write_credentials(staging, creds))
            staged.chmod(0o600 if creds["kind"] != "none" else 0o644)
            write_systemd_dropin(staging, profile)
            install_bundle(staging, out)
        except BaseException as exc:
            if enrolment is None:
                raise
            try:
                client.cancel_enrolment(args.id, enrolment)
            except Exception as undo:
                raise ConfigError(
                    f"device {args.id} is registered but its bundle could not be written to {out} ({exc}), "
                    f"and cancelling the enrolment failed too ({undo}): revoke it "
                    f"(`edgefleet-hub device revoke {args.id}`) and enrol the device under a new id"
                ) from exc
            progress(f"the bundle could not be written to {out}; the enrolment of {args.id} was cancelled")
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    path = out / "agent.toml"
    dropin = out / "edgefleet-agent.service.d" / "50-profile.conf"
    reload = "new password: reload the broker (kill -HUP <mosquitto pid>)\n"
    emit(args, {**info, "config": str(path), "credentials": creds["kind"],
                "systemd_dropin": str(dropin)},
         f"device {args.id} registered (broker credentials: {creds['kind']}); config in {path}\n"
         + (reload if creds.get("password") else "")
         + f"run it with: edgefleet-agent run --config {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgefleet.hub.cli.demo import run_demo

    return run_demo(seconds=args.seconds, broker_url=args.broker, home=args.home)


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from edgefleet.hub.cli.rollout import add_rollout_commands
    from edgefleet.hub.services.keys import add_keys_commands

    p = argparse.ArgumentParser(prog="edgefleet-hub", description="edgefleet hub: publish, deploy, watch")
    p.add_argument("--version", action="version", version=f"edgefleet-hub {__version__}")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, func: Any, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        sp.add_argument("--home", default=DEFAULT_HOME, help=f"hub home folder (default {DEFAULT_HOME})")
        return sp

    def client(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--hub", help="admin API URL (default: the hub serving from --home)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = cmd("init", cmd_init, "create a hub home: keys, database, config, admin token")
    sp.add_argument("--fleet", default="default", help="fleet name (default 'default')")
    sp.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="MQTT broker URL")
    sp.add_argument("--http", default="127.0.0.1:8400", help="HTTP listen address HOST:PORT")
    sp.add_argument("--public-url", help="URL agents use to reach this hub (default http://<--http>)")
    sp.add_argument("--db", metavar="URL", help="postgresql://USER@HOST[:PORT]/DB, shared by hub replicas "
                    "(default: sqlite, HOME/hub.db)")

    sp = cmd("serve", cmd_serve, "run the hub daemon (HTTP blob server + admin API, MQTT link)")
    sp.add_argument("--broker", help="MQTT broker URL (overrides hub.toml)")
    sp.add_argument("--http", help="HTTP listen address HOST:PORT (overrides hub.toml; port 0 = any)")
    sp.add_argument("--share", metavar="GROUP",
                    help="subscribe to device channels via MQTT shared subscription $share/GROUP/... "
                         "(hub replicas split the telemetry load)")
    sp.add_argument("--ingest-workers", type=int, default=1, metavar="N",
                    help="MQTT connections + ingest threads sharing the load (N>1 implies --share)")
    sp.add_argument("--replica", metavar="NAME",
                    help="this replica's name, one per hub process sharing a --share group: its MQTT "
                         "client id and persistent session (the broker queues its share while it is away)")

    sp = cmd("publish", cmd_publish, "validate and publish a model version (.onnx, or a scikit-learn, "
             "LightGBM or XGBoost model as .pkl/.joblib)")
    client(sp)
    sp.add_argument("--name", required=True)
    sp.add_argument("--version", required=True, dest="version")
    sp.add_argument("model", help="model file: .onnx, or a scikit-learn/LightGBM/XGBoost model .pkl/.joblib")
    sp.add_argument("--reference", help="training inputs for the reference distribution: .npy (a table or "
                    "N-D samples such as images), .npz (one array per model input), .csv or .parquet "
                    "(named columns, numbers and text)")
    sp.add_argument("--bins", type=int, default=10, help="reference bins per feature (default 10)")
    sp.add_argument("--hide-unseen", action="append", metavar="COLUMN",
                    help="a text column whose values never seen in training devices count but never name "
                         "(personal data: names, e-mail addresses); repeatable")
    sp.add_argument("--source", help="where the model comes from, e.g. a git commit")
    sp.add_argument("--author", help="who publishes (default: the current user)")
    sp.add_argument("--preflight", metavar="DATA", help="inputs (any --reference format) for the preflight set a "
                    "candidate must reproduce on each device (expected outputs from the sklearn source if given)")
    sp.add_argument("--preflight-rows", type=int, default=64, help="rows of DATA in the preflight set (default 64)")
    sp.add_argument("--atol", type=float, default=1e-4, help="preflight absolute tolerance (default 1e-4)")
    sp.add_argument("--rtol", type=float, default=1e-3, help="preflight relative tolerance (default 1e-3)")
    sp.add_argument("--label-agreement", type=float, default=1.0,
                    help="preflight: share of rows whose label must match (default 1.0)")
    sp.add_argument("--metric", action="append", metavar="NAME=VALUE", help="a metric (repeatable)")
    sp.add_argument("--metrics", metavar="FILE.json", help="metrics as a JSON object of name -> number")
    sp.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a free tag (repeatable)")
    sp.add_argument("--parent", metavar="VERSION", help="the version this one was derived from")

    sp = cmd("profiles", cmd_profiles, "list the device profiles available to `device add --profile`")
    sp.add_argument("--profiles-dir", help="where device profiles live (default: $EDGEFLEET_PROFILES, the package)")
    sp.add_argument("--json", action="store_true")

    sp = cmd("deploy", cmd_deploy, "set the version devices should run (signs a new desired state)")
    client(sp)
    sp.add_argument("model")
    sp.add_argument("version")
    sp.add_argument("--device", action="append", help="device id (repeatable)")
    sp.add_argument("--group", action="append", help="every device of this group (repeatable; "
                    "with --device: the union)")
    sp.add_argument("--wait", action="store_true",
                    help="wait until every targeted device runs the version (progress; exit 1 at --timeout)")
    sp.add_argument("--timeout", type=float, default=600.0, help="--wait: give up after this many seconds (600)")
    sp.add_argument("--interval", type=float, default=1.0, help="--wait: seconds between looks (1)")

    client(cmd("status", cmd_status, "devices, what they run, online/offline, last telemetry"))
    sp = cmd("events", cmd_events, "recent device events (updates, refusals, errors)")
    client(sp)
    sp.add_argument("--device")
    sp.add_argument("--limit", type=int, default=50)
    sp = cmd("models", cmd_models, "the registry: list | show NAME[:VERSION] | diff NAME A B")
    client(sp)
    sp.add_argument("action", nargs="?", choices=["list", "show", "diff"], default="list")
    sp.add_argument("args", nargs="*", help="show: NAME[:VERSION]; diff: NAME A B")
    sp = cmd("trace", cmd_trace, "a captured prediction: its model, lineage and the decision behind it")
    client(sp)
    sp.add_argument("--device", required=True)
    sp.add_argument("--request", required=True, help="the request id from the inference response")
    sp = cmd("audit", cmd_audit, "the hash-chained audit log: show, export (JSON Lines), verify")
    client(sp)
    sp.add_argument("action", nargs="?", choices=["show", "export", "verify"], default="show")
    sp.add_argument("--since", help="RFC 3339 time, e.g. 2026-11-28T00:00:00Z")

    sp = cmd("drift", cmd_drift, "drift per feature (PSI, Jensen-Shannon, KS) against the reference")
    client(sp)
    sp.add_argument("--model", help="only this model")

    dev = sub.add_parser("device", help="device enrolment").add_subparsers(dest="device_command", required=True)
    sp = cmd("add", cmd_device_add, "register a device and write its agent.toml", dev)
    client(sp)
    sp.add_argument("id", help="device id: 1-64 of A-Z a-z 0-9 _ . -")
    sp.add_argument("--out", required=True, help="folder for agent.toml, profile.toml, root.pub")
    sp.add_argument("--profile", default="generic-x86_64", help="device profile name")
    sp.add_argument("--group", help="device group (same rules as device ids); deploy --group G")
    sp.add_argument("--profiles-dir", help="where device profiles live")
    sp.add_argument("--listen", default="127.0.0.1:8500", help="the agent's local inference API")
    sp.add_argument("--state-dir", help="the agent's state folder (default: state/ beside agent.toml)")
    sp.add_argument("--window", type=float, help="override the profile's telemetry window (seconds)")
    sp.add_argument("--capture", type=float, metavar="RATE",
                    help="override the profile's data-capture sampling rate (0 = off, 1 = every request)")
    sp.add_argument("--credentials", default="auto",
                    choices=["auto", "cert", "password", "both", "none"],
                    help="broker credentials to issue (auto: a certificate once broker-config ran)")
    from edgefleet.hub.cli.security import add_security_commands

    add_security_commands(sub, dev, cmd, client)

    sp = cmd("demo", cmd_demo, "run hub, embedded broker and two agents on this machine")
    sp.add_argument("--seconds", type=float, help="stop after N seconds (default: run until Ctrl-C)")
    sp.add_argument("--broker", help="use this broker instead of the embedded one")
    add_keys_commands(sub, cmd)
    add_rollout_commands(sub, cmd)
    from edgefleet.hub.cli.tokens import add_token_commands

    add_token_commands(sub, cmd, client)
    from edgefleet.hub.cli.database import add_db_commands

    add_db_commands(sub, cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Daemons log to stdout (journald); client commands keep stdout for their results.
    stream = sys.stdout if args.command in ("serve", "demo") else sys.stderr
    logging.basicConfig(level=args.log_level.upper(), stream=stream,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except EdgefleetError as exc:
        print(f"edgefleet-hub: {safe_lines(str(exc))}", file=sys.stderr)  # it may quote what a device sent
        return 2


if __name__ == "__main__":
    sys.exit(main())
