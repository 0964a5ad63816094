"""The TOML files the hub writes (a device's ``agent.toml``, its own ``hub.toml``) hold values an
operator typed: each is written as a TOML string that reads back exactly, so a quote, a
backslash or a newline in a URL, name or path cannot end the string and add a key."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.contract.config import load_agent_config, toml_string
from edgefleet.hub.adapters import resources
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.cli.commands import write_agent_bundle
from tests.conftest import run_cli
from tests.hub._served import Served, serve

INJECT = 'x"\nca_file = "/etc/evil.pem'  # would add a key if written between quotes raw
HOSTILE = [INJECT, 'C:\\edge\\"state"\\', "tab\tcr\rnul\x00esc\x1b[31mdel\x7f", 'ends with \\', "é 温度 😀", ""]


@pytest.mark.parametrize("value", HOSTILE)
def test_toml_string_reads_back_as_written(value: str) -> None:
    assert tomllib.loads(f"k = {toml_string(value)}") == {"k": value}


def test_agent_toml_values_with_quotes_backslashes_and_newlines_read_back(tmp_path: Path) -> None:
    info = {"fleet": 'f"1', "device": "d\\1", "broker_url": f"mqtt://b/{INJECT}", "blob_url": "http://h/\n[x]\ny = 1",
            "root_public_key": 'k"\\'}
    path = write_agent_bundle(tmp_path, info, profile_path=resources.profile_path("generic-x86_64", None),
                              listen='127.0.0.1:8500"\nlisten = "0.0.0.0:8500', state_dir='st"ate\\dir\nz',
                              overrides={"telemetry": {"window_seconds": 2.5}})
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    assert doc == {"fleet": 'f"1', "device": "d\\1", "broker_url": f"mqtt://b/{INJECT}",
                   "blob_url": "http://h/\n[x]\ny = 1", "root_public_key": 'k"\\',
                   "state_dir": 'st"ate\\dir\nz', "listen": '127.0.0.1:8500"\nlisten = "0.0.0.0:8500',
                   "profile": "profile.toml", "overrides": {"telemetry": {"window_seconds": 2.5}}}


def test_hub_toml_values_read_back_after_init_and_update(tmp_path: Path) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url=f"mqtt://b:1883/{INJECT}", http_listen="127.0.0.1:0",
              public_url='http://hub.lan:8400/"\\')
    cfg = home.config()
    assert (cfg.broker_url, cfg.public_url) == (f"mqtt://b:1883/{INJECT}", 'http://hub.lan:8400/"\\')
    home.update_config(public_url="https://hub.例え.jp/😀", broker_url="mqtt://x\n[evil]")
    cfg = home.config()  # hub.toml refuses unknown keys: an injected one would fail here
    assert (cfg.public_url, cfg.broker_url) == ("https://hub.例え.jp/😀", "mqtt://x\n[evil]")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as s:
        yield s


def test_device_add_writes_an_operator_state_dir_the_agent_reads_as_typed(served: Served, tmp_path: Path) -> None:
    state = 'state "q" \\ dir\nca_file = "x'
    run_cli("edgefleet.hub.cli.main", "device", "add", "d7", "--home", str(served.hub.home.path), "--hub", served.url,
            "--out", str(tmp_path / "d7"), "--state-dir", state)
    cfg = load_agent_config(tmp_path / "d7" / "agent.toml")
    assert cfg.state_dir == tmp_path / "d7" / state and cfg.device == "d7"
    assert "ca_file" not in tomllib.loads((tmp_path / "d7" / "agent.toml").read_text(encoding="utf-8"))


def test_device_add_into_a_mount_point_installs_the_bundle(served: Served, tmp_path: Path) -> None:
    """A device's folder on its own file system (a partition, a tmpfs): the bundle cannot be
    staged beside it (os.replace across file systems fails with EXDEV), so it is staged inside."""
    import os
    import subprocess

    out = tmp_path / "d8"
    out.mkdir(mode=0o700)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(out)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs (CI runs as root)")
    try:
        (out / "keep.txt").write_text("an operator's file")
        run_cli("edgefleet.hub.cli.main", "device", "add", "d8", "--home", str(served.hub.home.path), "--hub",
                served.url, "--out", str(out))
        assert load_agent_config(out / "agent.toml").device == "d8"
        assert (out / "keep.txt").read_text() == "an operator's file"
        assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]
        assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
