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

from edgefleet.agent.contract.config import toml_string, toml_value
from edgefleet.agent.contract.wire import check_name
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.errors import BadRequest

__all__ = ["build_publish_request", "cmd_status", "emit", "lineage_options", "progress", "safe", "safe_lines",
           "write_agent_bundle"]

# What a terminal acts on instead of showing: C0 controls (newline, carriage return, ESC that
# starts ANSI sequences, ...), DEL, C1 controls (0x9b is a one-byte CSI), and the Unicode line
# separators and bidirectional overrides that reorder or split what is shown.
_UNSAFE = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                    *range(0x2066, 0x206A))},
}


def safe(value: object) -> str:
    """``value`` as text a terminal shows as is: control characters as ``\\xNN`` / ``\\uNNNN``
    escapes, so a device's event message, reported version or reason cannot add a line,
    overwrite one (``\\r``), or send an escape sequence. Apply it to each field a device (or an
    API caller) chose before it goes into a line."""
    return str(value).translate(_UNSAFE)


def safe_lines(text: str) -> str:
    """Every line of ``text`` through :func:`safe`; the line breaks themselves stay."""
    return "\n".join(safe(line) for line in text.split("\n"))


def emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    """Print the result: JSON (``--json``: escapes every control character) or ``text``, whose
    lines are passed through :func:`safe_lines` (its fields should have been through :func:`safe`
    already: only they know which line breaks are the command's own)."""
    print(json.dumps(obj, indent=2) if getattr(args, "json", False) else safe_lines(text))


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- commands ----------------------------------------------------------------------------------


def build_publish_request(args: argparse.Namespace) -> dict[str, Any]:
    """Load, convert and describe a model on the publisher's machine; the hub validates again.

    The reference (and the preflight set) may be any data :func:`hub.adapters.modelfile.read_data`
    reads; it is lined up with the model's inputs by name (:func:`~hub.adapters.modelfile.match_inputs`).
    A scikit-learn estimator whose data has text columns is converted with one input per column."""
    import base64

    import numpy as np

    from edgefleet.hub.adapters.modelfile import (
        compute_inputs_reference,
        compute_reference,
        estimator_columns,
        is_categorical,
        load_estimator,
        load_model_file,
        match_inputs,
        model_inputs,
        read_data,
        run_outputs,
    )

    model = Path(args.model)
    data: dict[str, Any] | None = None
    digest = None
    named = False
    if args.reference:
        progress(f"reading reference data {args.reference}")
        data, digest, named = read_data(Path(args.reference))
        if Path(args.reference).suffix == ".npz" and model.suffix != ".onnx":
            raise BadRequest(f"--reference {Path(args.reference).name} (an .npz, one array per input) goes with an "
                             f".onnx model, got {model.name}")
    progress(f"loading model {args.model}")
    estimator = load_estimator(model)  # None for an .onnx file; read once, used twice
    columns = estimator_columns(estimator, data, named, Path(args.reference).name) \
        if estimator is not None and data is not None else None
    fitted = getattr(estimator, "feature_names_in_", None)
    order = [str(c) for c in fitted] if fitted is not None and named and not columns else None
    n_features = None  # for one float input: the estimator's columns, else the file's, else the array's width
    if estimator is not None and data is not None and not columns:
        if named:
            n_features = len(order) if order is not None else len(data)
        else:
            n_features = int(np.prod(data[""].shape[1:]))
    onnx_bytes, source_kind = load_model_file(model, n_features, estimator, columns)
    inputs_spec = model_inputs(onnx_bytes)
    reference = None
    inputs = None
    if data is not None:
        inputs = match_inputs(data, named, inputs_spec, Path(args.reference).name, order)
        outputs = None
        try:
            outputs = run_outputs(onnx_bytes, inputs)
        except Exception as exc:  # reference output distribution is optional
            progress(f"warning: could not run the model on the reference data: {exc}")
        first, only = next(iter(inputs.items()))
        if len(inputs) == 1 and not is_categorical(only):  # one numeric input: columns f0.., as always
            reference = compute_reference(np.asarray(only, dtype=np.float64), bins=args.bins, outputs=outputs,
                                          input_name=first).to_dict()
        else:
            hide = frozenset(getattr(args, "hide_unseen", None) or ())
            ref = compute_inputs_reference(inputs, bins=args.bins, outputs=outputs, hide_unseen=hide)
            unknown = sorted(hide - {c.name for c in ref.categories})
            if unknown:
                raise BadRequest(f"--hide-unseen {unknown}: not text columns of this model; its text columns are "
                                 f"{[c.name for c in ref.categories]}")
            reference = ref.to_dict()
    preflight = None
    if getattr(args, "preflight", None):
        from edgefleet.hub.adapters.gbm import is_raw_booster
        from edgefleet.hub.adapters.preflight import build_preflight

        progress(f"building the preflight set from {args.preflight}")
        pf_arrays, _, pf_named = read_data(Path(args.preflight))
        pf_inputs = match_inputs(pf_arrays, pf_named, inputs_spec, Path(args.preflight).name, order)
        source = None if is_raw_booster(estimator) else estimator  # its outputs from ONNX Runtime then
        blob = build_preflight(onnx_bytes, pf_inputs, source, rows=args.preflight_rows)
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
            "training_rows": len(next(iter(inputs.values()))) if inputs else None,
            "author": args.author or getpass.getuser(),
            **lineage_options(args),
        },
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
        runs = safe(", ".join(f"{k} {v}" + (f" +{cands[k]['version']} {cands[k].get('mode') or ''}".rstrip()
                                             if k in cands else "")
                              for k, v in d["models"].items()) or "-")  # as the device reported it
        want = safe(", ".join(f"{k} {v}" for k, v in d["desired"].items()) or "-")
        reqs = sum(t["requests"] for t in d["telemetry_totals"])
        last = d["last_telemetry"]["window_end"] if d["last_telemetry"] else "-"
        lines.append(f"{safe(d['device']):20} {safe(d['status']):10} {runs:28} {want:28} {reqs:>7} {last:24} "
                     f"{safe(d.get('group') or '-')}")
    ctl = st.get("controller") or {}
    if ctl:  # last: which replica answered, and which one judges rollouts
        lines.append(f"replica {safe(ctl['replica'])} ({'the controller' if ctl['leading'] else 'not the controller'}); "
                     f"controller {safe(ctl['leader'] or 'none yet')} epoch {ctl['leader_epoch'] or '-'}, "
                     f"heartbeat {ctl['heartbeat_age_seconds'] if ctl['heartbeat_age_seconds'] is not None else '-'} s ago; "
                     f"database {safe((st.get('database') or {}).get('engine', '?'))}")
    emit(args, st, "\n".join(lines))
    return 0



def _broker_lines(urls: str) -> list[str]:
    """``broker_url``: one URL as a string, the nodes of a cluster as a TOML array (the agent
    starts on one at random and fails over between them)."""
    nodes = [u.strip() for u in urls.split(",")]
    if len(nodes) == 1:
        return [f"broker_url = {toml_string(nodes[0])}"]
    return ["# the broker's nodes: the agent starts on one drawn at random and fails over between them",
            f"broker_url = [{', '.join(toml_string(u) for u in nodes)}]"]

def write_agent_bundle(
    out: Path, info: dict[str, Any], *, profile_path: Path, listen: str, state_dir: str,
    overrides: dict[str, Any] | None = None, extra_lines: list[str] | None = None,
) -> Path:
    """Write agent.toml, profile.toml and root.pub into ``out``; return the agent.toml path.
    Every value is written as a TOML value (:func:`agent.contract.config.toml_string`), so what
    the hub or the operator gave (URLs, names, paths) reads back as given, quotes, backslashes
    and newlines included, and can never add a key."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(profile_path, out / "profile.toml")
    (out / "root.pub").write_text(info["root_public_key"] + "\n", encoding="utf-8")
    lines = [
        "# edgefleet agent configuration, written by `edgefleet-hub device add`",
        f"fleet = {toml_string(info['fleet'])}",
        f"device = {toml_string(info['device'])}",
        *_broker_lines(str(info["broker_url"])),
        f"blob_url = {toml_string(info['blob_url'])}",
        "# the fleet root public key (Ed25519, base64): the device's trust anchor",
        f"root_public_key = {toml_string(info['root_public_key'])}",
        f"state_dir = {toml_string(state_dir)}",
        f"listen = {toml_string(listen)}",
        'profile = "profile.toml"',
        *(extra_lines or []),
    ]
    for section, values in (overrides or {}).items():
        check_name(section, "overrides section")
        lines.append(f"\n[overrides.{section}]")
        lines += [f"{check_name(k, 'overrides key')} = {toml_value(v)}" for k, v in values.items()]
    path = out / "agent.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
