"""`edgefleet-hub demo --seconds N` runs the whole loop on the embedded broker, shows it on its fleet page, and stops cleanly."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests._browser import Page, browser
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.slow


def test_demo_runs_to_completion_on_the_embedded_broker_and_its_page_shows_the_rollback() -> None:
    """The demo prints its fleet page and a token; the page, open in headless Chromium, shows the
    demo's rollback as it happens (then the demo stops, as it always did)."""
    demo = subprocess.Popen([sys.executable, "-m", "edgefleet.hub.cli.main", "demo", "--seconds", "3"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    driver = None
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "fleet page:" in line:
                break
        m = re.search(r"fleet page: (http://\S+)/ui\s+\(log in with the token (\S+)\)", "".join(lines))
        assert m, "".join(lines)
        driver = browser()
        p = Page(driver, m.group(1))
        p.login(m.group(2))
        assert "demo-operator (operator)" in p.text_of("#who")
        p.go("#/rollouts")
        wait_for(lambda: "r-1" in p.text(), 60, "the demo's rollout on the page")
        p.go("#/rollout/r-1")
        wait_for(lambda: "rolled_back" in p.text_of("#view h1"), 60, "the rollback on the page as it happens")
        wait_for(lambda: "rollout_rollback" in p.text(), 20, "the rollback in the decision history")
        p.shot("demo-rollback")
    finally:
        if driver is not None:
            driver.quit()
        rest, _ = demo.communicate(timeout=180)
    out = "".join(lines) + rest
    assert demo.returncode == 0, out
    assert "embedded MQTT broker" in out
    assert "both agents serve iris 1.0.0" in out
    rows = re.findall(r"^(demo-\S+)\s+online\s+iris 1\.0\.0\s+iris 1\.0\.0\s+(\d+)", out, re.M)
    assert len(rows) == 2, out
    assert all(int(n) > 0 for _, n in rows), out
    # the bad version shadows 1.0.0 on the first cohort and the hub's gate takes it back
    assert re.search(r"rollout r-1 ROLLED_BACK: agreement 0\.\d+ < min 0\.95", out), out
    assert "rollout_rollback by rollout-gate" in out
    assert out.rstrip().endswith("[demo] stopped cleanly")
