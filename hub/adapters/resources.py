"""Files that ship with edgefleet: device profiles, systemd units, broker/Prometheus/Grafana configs.

In a wheel they are package data (``edgefleet/hub/profiles/``, ``edgefleet/hub/deploy/``), found
through :mod:`importlib.resources`; in a source checkout or an editable install they are the
repository's top-level ``device-profiles/`` and ``deploy/`` folders. ``--profiles-dir`` and
``$EDGEFLEET_PROFILES`` override where profiles are looked up.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from edgefleet.agent.contract.errors import ConfigError

__all__ = ["deploy_dir", "list_profiles", "profile_path", "profiles_dir"]

# package-data folder -> source-tree folder
_SHIPPED = {"profiles": "device-profiles", "deploy": "deploy"}


def _shipped(name: str) -> Path:
    packaged = files("edgefleet.hub") / name
    if packaged.is_dir():  # a wheel: files() of an on-disk package is a pathlib.Path
        return Path(str(packaged))
    source = Path(__file__).resolve().parents[2] / _SHIPPED[name]
    if source.is_dir():
        return source
    raise ConfigError(f"edgefleet's {_SHIPPED[name]} files are missing: looked in {packaged} and {source}; "
                      "reinstall the package")


def profiles_dir(explicit: str | None = None) -> Path:
    """Where device profiles are looked up: ``--profiles-dir``, ``$EDGEFLEET_PROFILES``, the package."""
    for cand in (explicit, os.environ.get("EDGEFLEET_PROFILES")):
        if cand:
            path = Path(cand)
            if not path.is_dir():
                raise ConfigError(f"profiles folder {path} does not exist (expected a folder of *.toml)")
            return path
    return _shipped("profiles")


def list_profiles(explicit: str | None = None) -> list[str]:
    """Profile names (file stems) available in :func:`profiles_dir`, sorted."""
    return sorted(p.stem for p in profiles_dir(explicit).glob("*.toml"))


def profile_path(name: str, explicit: str | None = None) -> Path:
    """The file of profile *name*, or a ConfigError naming the ones there are."""
    folder = profiles_dir(explicit)
    path = folder / f"{name}.toml"
    if "/" in name or not path.is_file():
        raise ConfigError(f"no device profile {name!r} in {folder}; available: "
                          f"{', '.join(list_profiles(explicit)) or 'none'}")
    return path


def deploy_dir() -> Path:
    """systemd units, mosquitto.conf, prometheus.yml and the Grafana dashboard as shipped."""
    return _shipped("deploy")
