"""The parts of a provisioning bundle beyond ``agent.toml``: broker credentials and the systemd
drop-in that sizes the service from the device profile.

    ca.pem                       the device CA: the agent pins it for the broker's certificate
    client.pem / client.key      the device's certificate (CN = device id) and key (0600)
    mqtt.password                the device's MQTT password (0600), username = device id
    edgefleet-agent.service.d/   ``50-profile.conf``: MemoryHigh/MemoryMax from the profile
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.config import DeviceProfile

__all__ = ["RUNTIME_OVERHEAD_MB", "install_bundle", "staging_folder", "systemd_dropin", "write_credentials",
           "write_systemd_dropin"]

# Python, ONNX Runtime, numpy and the agent itself, measured around 150 MiB RSS on x86-64;
# kept generous so the kernel's OOM killer is a last resort, not a routine event.
RUNTIME_OVERHEAD_MB = 256


def write_credentials(out: Path, creds: Mapping[str, Any]) -> list[str]:
    """Write the credential files; return the ``agent.toml`` lines that point at them."""
    lines: list[str] = []
    if creds.get("ca_pem"):
        atomic_write(out / "ca.pem", str(creds["ca_pem"]).encode(), mode=0o644)
        lines += [
            "# the broker's (mqtts) and the hub's (https blobs) certificates must chain to this CA",
            'ca_file = "ca.pem"',
        ]
    if creds.get("cert_pem"):
        atomic_write(out / "client.pem", str(creds["cert_pem"]).encode(), mode=0o644)
        atomic_write(out / "client.key", str(creds["key_pem"]).encode(), mode=0o600)
        lines += [
            f"# client certificate serial {creds.get('serial')} (CN = device id)",
            'cert_file = "client.pem"',
            'key_file = "client.key"',
        ]
    if creds.get("capture_token"):
        atomic_write(out / "capture.token", (str(creds["capture_token"]) + "\n").encode(), mode=0o600)
        lines += ["# data-capture uploads to the hub authenticate with this token",
                  'capture_token_file = "capture.token"']
    if creds.get("password"):
        atomic_write(out / "mqtt.password", (str(creds["password"]) + "\n").encode(), mode=0o600)
        lines += ["# MQTT password (username = device id)", 'password_file = "mqtt.password"']
    return lines


def systemd_dropin(profile: DeviceProfile) -> str:
    high = profile.memory_budget_mb + RUNTIME_OVERHEAD_MB * 3 // 4
    top = profile.memory_budget_mb + RUNTIME_OVERHEAD_MB
    return (
        f"# Sized from device profile {json.dumps(profile.name)}: memory_budget_mb = "
        f"{profile.memory_budget_mb} for models\n"
        f"# plus {RUNTIME_OVERHEAD_MB} MiB for the runtime. Install as\n"
        "# /etc/systemd/system/edgefleet-agent.service.d/50-profile.conf,\n"
        "# then systemctl daemon-reload.\n"
        "[Service]\n"
        f"MemoryHigh={high}M\n"
        f"MemoryMax={top}M\n"
    )


def write_systemd_dropin(out: Path, profile: DeviceProfile) -> Path:
    folder = out / "edgefleet-agent.service.d"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "50-profile.conf"
    atomic_write(path, systemd_dropin(profile).encode(), mode=0o644)
    return path


def staging_folder(out: Path) -> Path:
    """An empty folder beside ``out`` (same file system) to write a bundle into before it is
    moved into place by :func:`install_bundle`. Fails, before any enrolment, where ``out``
    cannot be written."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir() and out.stat().st_dev != out.parent.stat().st_dev:
        # ``out`` is a mount point (a device's state partition): beside it is another file
        # system, where os.replace cannot reach; stage inside it instead.
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def install_bundle(staging: Path, out: Path) -> None:
    """Move the bundle in ``staging`` to ``out``: one rename when ``out`` does not exist (or is
    an empty folder), else file by file (each ``os.replace`` atomic), keeping other files."""
    with contextlib.suppress(FileNotFoundError, OSError):
        out.rmdir()  # only an empty folder
    if not out.exists():
        staging.rename(out)
        return
    for src in sorted(staging.rglob("*")):
        dest = out / src.relative_to(staging)
        if src.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            os.replace(src, dest)
