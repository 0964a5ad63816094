"""Command bodies the CLI and the demo share: publishing a model, the status table, agent bundles.

Kept apart from :mod:`hub.cli.main` (argument parsing and dispatch) so the demo can use
them without importing the CLI that launches it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.errors import BadRequest

__all__ = ["build_publish_request", "cmd_status", "emit", "lineage_options", "progress", "write_agent_bundle"]


def emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2) if getattr(args, "json", False) else text)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- commands ----------------------------------------------------------------------------------


def build_publish_request(args: argparse.Namespace) -> dict[str, Any]:
    """Load, convert and describe a model on the publisher's machine; the hub validates again."""
    from edgefleet.hub.adapters.modelfile import (
        compute_reference,
        load_estimator,
        load_model_file,
        load_reference_data,
        run_first_output,
    )

    data = None
    digest = None
    if args.reference:
        progress(f"reading reference data {args.reference}")
        data, digest = load_reference_data(Path(args.reference))
    progress(f"loading model {args.model}")
    estimator = load_estimator(Path(args.model))  # None for an .onnx file; read once, used twice
    onnx_bytes, source_kind = load_model_file(Path(args.model), data.shape[1] if data is not None else None,
                                              estimator)
    reference = None
    if data is not None:
        outputs = None
        try:
            outputs = run_first_output(onnx_bytes, data)
        except Exception as exc:  # reference output distribution is optional
            progress(f"warning: could not run the model on the reference data: {exc}")
        reference = compute_reference(data, bins=args.bins, outputs=outputs).to_dict()
    import base64

    preflight = None
    if getattr(args, "preflight", None):
        from edgefleet.hub.adapters.preflight import build_preflight

        progress(f"building the preflight set from {args.preflight}")
        pf_data, _ = load_reference_data(Path(args.preflight))
        blob = build_preflight(onnx_bytes, pf_data, estimator, rows=args.preflight_rows)
        preflight = {"blob_b64": base64.b64encode(blob).decode(), "atol": args.atol, "rtol": args.rtol,
                     "label_agreement": args.label_agreement}
    return {
        "preflight": preflight,
        "name": args.name,
        "version": args.version,
        "model_b64": base64.b64encode(onnx_bytes).decode(),
        "reference": reference,
        "lineage": {
            "source": args.source or "",
            "converted_from": source_kind,
            "training_data_sha256": digest,
            "training_rows": int(data.shape[0]) if data is not None else None,
            "author": args.author or getpass.getuser(),
            **lineage_options(args),
        },
        "actor": args.author or getpass.getuser(),
    }


def lineage_options(args: argparse.Namespace) -> dict[str, Any]:
    """metrics (--metrics FILE.json, then each --metric NAME=VALUE), tags, parent, as the hub
    checks them (hub.lineage)."""
    from edgefleet.hub.core.lineage import clean_lineage, parse_pairs

    metrics: dict[str, Any] = {}
    if getattr(args, "metrics", None):
        try:
            metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BadRequest(f"--metrics {args.metrics}: expected a JSON object of name -> number: {exc}") from exc
    metrics = {**clean_lineage({"metrics": metrics})["metrics"],
               **parse_pairs(getattr(args, "metric", None) or [], "metric", numeric=True)}
    tags = parse_pairs(getattr(args, "tag", None) or [], "tag", numeric=False)
    return {"metrics": metrics, "tags": tags, "parent": getattr(args, "parent", None)}


def cmd_status(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    st = HubClient.for_home(home, args.hub).status()
    lines = [f"fleet {st['fleet']}: {len(st['devices'])} device(s)"]
    keyring = st.get("keyring") or {}
    if keyring.get("state") in ("renew", "expired"):  # only the root key holder can fix it: say so first
        lines.append(f"WARNING: {keyring['message']}")
    lines.append(f"{'DEVICE':20} {'STATUS':10} {'RUNS':28} {'DESIRED':28} {'REQS':>7} {'LAST WINDOW':24} GROUP")
    for d in st["devices"]:
        cands = d.get("candidates") or {}
        runs = ", ".join(f"{k} {v}" + (f" +{cands[k]['version']} {cands[k].get('mode') or ''}".rstrip()
                                        if k in cands else "")
                         for k, v in d["models"].items()) or "-"
        want = ", ".join(f"{k} {v}" for k, v in d["desired"].items()) or "-"
        reqs = sum(t["requests"] for t in d["telemetry_totals"])
        last = d["last_telemetry"]["window_end"] if d["last_telemetry"] else "-"
        lines.append(f"{d['device']:20} {d['status']:10} {runs:28} {want:28} {reqs:>7} {last:24} "
                     f"{d.get('group') or '-'}")
    emit(args, st, "\n".join(lines))
    return 0


def write_agent_bundle(
    out: Path, info: dict[str, Any], *, profile_path: Path, listen: str, state_dir: str,
    overrides: dict[str, Any] | None = None, extra_lines: list[str] | None = None,
) -> Path:
    """Write agent.toml, profile.toml and root.pub into ``out``; return the agent.toml path."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(profile_path, out / "profile.toml")
    (out / "root.pub").write_text(info["root_public_key"] + "\n")
    lines = [
        "# edgefleet agent configuration, written by `edgefleet-hub device add`",
        f'fleet = "{info["fleet"]}"',
        f'device = "{info["device"]}"',
        f'broker_url = "{info["broker_url"]}"',
        f'blob_url = "{info["blob_url"]}"',
        "# the fleet root public key (Ed25519, base64): the device's trust anchor",
        f'root_public_key = "{info["root_public_key"]}"',
        f"state_dir = {json.dumps(state_dir)}",
        f'listen = "{listen}"',
        'profile = "profile.toml"',
        *(extra_lines or []),
    ]
    for section, values in (overrides or {}).items():
        lines.append(f"\n[overrides.{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = out / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
