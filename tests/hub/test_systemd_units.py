"""The unit files in deploy/ pass `systemd-analyze verify` (skipped where systemd is absent)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.contract.config import load_profile
from edgefleet.hub.cli.bundle import write_systemd_dropin
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (no systemd here)"
)


def _installed_copy(unit: str, tmp_path: Path, edit: str = "") -> Path:
    """The unit with ExecStart pointing at this environment's console script (verify checks that
    the binary exists), plus an optional extra line to prove the check can fail."""
    name = unit.split(".", maxsplit=1)[0]
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    text = (DEPLOY / unit).read_text().replace(f"/usr/bin/{name}", exe)
    if edit:
        text = text.replace("[Service]\n", f"[Service]\n{edit}\n")
    path = tmp_path / unit
    path.write_text(text)
    return path


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", str(path)], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.mark.parametrize("unit", ["edgefleet-agent.service", "edgefleet-hub.service"])
def test_unit_file_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    if not (
        shutil.which(unit.split(".", maxsplit=1)[0])
        or (Path(sys.executable).parent / unit.split(".", maxsplit=1)[0]).exists()
    ):
        pytest.skip(f"console script for {unit} is not installed")
    res = _verify(_installed_copy(unit, tmp_path))
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_verify_does_report_a_mistyped_directive(tmp_path: Path) -> None:
    res = _verify(_installed_copy("edgefleet-agent.service", tmp_path, edit="WatchdogSecs=30s"))
    assert "WatchdogSecs" in res.stdout + res.stderr


def test_profile_dropins_written_at_enrolment_pass_verify_with_the_agent_unit(
    tmp_path: Path,
) -> None:
    if not shutil.which("edgefleet-agent"):
        pytest.skip("console script edgefleet-agent is not installed")
    unit = _installed_copy("edgefleet-agent.service", tmp_path)
    for profile in sorted((DEPLOY.parent / "device-profiles").glob("*.toml")):
        write_systemd_dropin(tmp_path, load_profile(profile))
        res = _verify(unit)
        assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), (
            profile.name,
            res.stdout + res.stderr,
        )
