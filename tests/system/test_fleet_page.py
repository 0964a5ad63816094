"""The fleet page in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium) against a real hub process with two real agents serving traffic.

An operator logs in with a token, sees the fleet, opens a running rollout, presses Pause and sees
the state change on the page and in the audit log under its token's name. A viewer sees no
buttons and is refused by the API when it tries anyway. The drift page draws a chart for each
feature. Screenshots of every page go to test-artifacts/ui/ for a person to look at. The demo's
page is tested in tests/system/test_demo.py.
"""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from tests._browser import Page, browser
from tests.conftest import REPO, Procs, free_port, http_ok, infer_load, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
CLI = "edgefleet.hub.cli.main"
@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.conftest import Broker

    tmp = tmp_path_factory.mktemp("page")
    (tmp / "broker").mkdir()
    broker = Broker(tmp / "broker")
    broker.start()
    procs = Procs(tmp)
    home, port = tmp / "hub", free_port()
    h = ("--home", str(home))
    run_cli(CLI, "init", *h, "--fleet", "plant", "--broker", broker.url, "--http", f"127.0.0.1:{port}")
    (home / "rollout.toml").write_text("evaluate_seconds = 0.5\n[policy]\nmin_step_seconds = 900\n"
                                       "step_deadline_seconds = 1800\n")
    (home / "drift.toml").write_text("window_seconds = 20\nbucket_seconds = 1\nevaluate_seconds = 0\nmin_rows = 20\n")
    stop = threading.Event()
    try:
        procs.start("hub", CLI, "serve", *h)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base}/healthz"), 30, "hub HTTP")
        x, y = make_classification(n_samples=500, n_features=4, n_informative=3, n_redundant=0, random_state=2)
        x = x.astype(np.float32)
        np.save(tmp / "train.npy", x)
        for version, c in (("1", 1.0), ("2", 0.3)):
            (tmp / f"v{version}.pkl").write_bytes(pickle.dumps(LogisticRegression(C=c, max_iter=300).fit(x, y)))
            run_cli(CLI, "publish", str(tmp / f"v{version}.pkl"), "--name", "clf", "--version", version,
                    "--reference", str(tmp / "train.npy"), "--metric", f"accuracy=0.9{version}",
                    *(["--parent", "1"] if version == "2" else []), *h)
        ports = {}
        for dev in ("cam-01", "cam-02"):
            ports[dev] = free_port()
            run_cli(CLI, "device", "add", dev, *h, "--out", str(tmp / dev), "--listen", f"127.0.0.1:{ports[dev]}",
                    "--window", "0.5", "--group", "line-1")
            procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config", str(tmp / dev / "agent.toml"))
        run_cli(CLI, "deploy", "clf", "1", "--device", "cam-01", "--device", "cam-02", *h)
        token = (home / "admin.token").read_text().strip()

        def on_v1() -> bool:
            st = httpx.get(f"{base}/api/v1/status", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
            return all(d["models"].get("clf") == "1" for d in st["devices"])

        wait_for(on_v1, 60, "both agents on clf 1")
        load = infer_load(ports.values, x, stop, rows=8, seed=3)
        ro = json.loads(run_cli(CLI, "rollout", "start", "clf", "2", "--steps", "50,100", "--fraction", "1.0",
                                "--json", *h).stdout)
        viewer = json.loads(run_cli(CLI, "token", "add", "watcher", "--role", "viewer", "--json", *h).stdout)
        driver = browser()
        try:
            yield {"base": base, "token": token, "viewer": viewer["token"], "rollout": ro["id"], "home": home,
                   "page": Page(driver, base), "x": x}
        finally:
            driver.quit()
        stop.set()
        load.join(5)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        stop.set()
        procs.stop_all()
        broker.stop()


def test_operator_sees_the_fleet_and_pauses_a_rollout_from_the_page(env: dict[str, Any]) -> None:
    p: Page = env["page"]
    p.login(env["token"])
    wait_for(lambda: p.count("#devices tbody tr") == 2, 20, "two devices in the fleet table")
    p.css("input[aria-label='filter']")[0].send_keys("cam-02")
    wait_for(lambda: p.count("#devices tbody tr") == 1, 10, "the filter to leave one device")
    p.d.execute_script("const i = document.querySelector(\"input[aria-label='filter']\"); i.value = '';"
                       "i.dispatchEvent(new Event('input'))")
    wait_for(lambda: p.count("#devices tbody tr") == 2, 10, "both devices again")
    body = p.text()
    assert "cam-01" in body and "cam-02" in body and "line-1" in body
    wait_for(lambda: "clf 1" in p.text() or "clf 2" in p.text(), 20, "what the devices run")
    assert p.count("svg[aria-label='versions of clf']")  # the versions bar
    p.shot("fleet")
    p.go(f"#/rollout/{env['rollout']}")
    wait_for(lambda: p.count("#pause"), 20, "the Pause button on a running rollout")
    assert p.count("#gates tbody tr") and p.count("#steps rect")
    cohort = p.d.execute_script("return [...document.querySelectorAll(\"#view a[href^='#/device/']\")].map(a => a.textContent)")
    assert cohort and set(cohort) <= {"cam-01", "cam-02"}, cohort  # the cohort, as links to the device pages
    p.shot("rollout-running")
    p.click("#pause")
    wait_for(lambda: p.count("#resume"), 20, "the page to show the rollout paused")
    assert "paused" in p.text_of("#view h1")
    p.shot("rollout-paused")
    audit = httpx.get(f"{env['base']}/api/v1/audit?limit=50", headers={"Authorization": f"Bearer {env['token']}"},
                      timeout=5).json()["entries"]
    paused = [e for e in audit if e["action"] == "rollout_pause"]
    assert paused and paused[-1]["actor"] == "admin", paused  # the token's name, not something the page said
    wait_for(lambda: "rollout_pause" in p.text_of("#history"), 20, "the pause in the history")
    p.click("#resume")
    wait_for(lambda: p.count("#pause"), 20, "running again")


def test_a_viewer_sees_no_buttons_and_the_api_refuses_it(env: dict[str, Any]) -> None:
    p: Page = env["page"]
    p.login(env["viewer"])
    assert "watcher (viewer)" in p.text_of("#who")
    p.go(f"#/rollout/{env['rollout']}")
    wait_for(lambda: p.count("#gates"), 20, "the rollout page")
    assert p.count("#pause, #resume, #promote, #abort") == 0
    p.shot("rollout-viewer")
    r = httpx.post(f"{env['base']}/api/v1/rollouts/action", json={"action": "abort", "rollout": env["rollout"]},
                   headers={"Authorization": f"Bearer {env['viewer']}"}, timeout=5)
    assert r.status_code == 403 and "viewer" in r.json()["error"]


def test_the_drift_page_draws_a_chart_for_each_feature(env: dict[str, Any]) -> None:
    p: Page = env["page"]
    p.login(env["token"])
    p.go("#/drift/clf")
    wait_for(lambda: p.count("#features .feature") == 5, 40, "a panel per feature and one for the probabilities")
    per_feature = p.d.execute_script(
        "return [...document.querySelectorAll('#features .feature')].map(f => [f.dataset.feature,"
        " f.querySelectorAll('svg[aria-label^=\"histogram\"] rect').length, f.querySelectorAll('svg polyline').length])")
    # the classifier's second output (probabilities) is described too: its top class's confidence
    assert [f[0] for f in per_feature] == ["f0", "f1", "f2", "f3", "output.probabilities.confidence"]
    assert all(bars >= 10 for name, bars, _ in per_feature if name.startswith("f")), per_feature  # both per bin
    assert per_feature[-1][1] >= 2, per_feature
    p.shot("drift")


def test_device_model_and_audit_pages(env: dict[str, Any]) -> None:
    p: Page = env["page"]
    p.login(env["token"])
    p.go("#/device/cam-01")
    wait_for(lambda: p.count("#runs tbody tr") and p.count("svg[aria-label='latency histogram'] rect"), 30,
             "the device page with its latency histogram")
    assert "cam-01" in p.text_of("#view h1")
    p.shot("device")
    p.go("#/model/clf")
    wait_for(lambda: p.count("#versions tbody tr") == 2 and p.count("#diff"), 20, "both versions and their diff")
    assert "accuracy=0.92" in p.text() and "metric accuracy" in p.text_of("#diff")
    p.shot("model")
    p.go("#/audit")
    wait_for(lambda: p.count("#audit tbody tr") and "chain verified" in p.text(), 20, "the verified audit log")
    p.shot("audit")
    # the token never appears in a URL the page made
    assert env["token"] not in p.d.current_url


def test_cli_watches_a_rollout_to_its_decision_and_waits_for_a_deploy(env: dict[str, Any]) -> None:
    h = ("--home", str(env["home"]))
    still = run_cli(CLI, "rollout", "status", env["rollout"], "--watch", "--json", "--timeout", "2", *h, check=False)
    assert still.returncode == 2, still.stderr  # no decision within the timeout: the step lasts 900 s
    assert json.loads(still.stdout.splitlines()[0])["state"] in ("running", "paused")
    watcher = subprocess.Popen([sys.executable, "-m", CLI, "rollout", "status", env["rollout"], "--watch", "--json",
                                "--interval", "0.3", "--timeout", "60", *h], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    run_cli(CLI, "rollout", "promote", env["rollout"], "--reason", "test", *h)
    out, err = watcher.communicate(timeout=90)
    assert watcher.returncode == 0, err  # promoted
    frames = [json.loads(line) for line in out.splitlines()]
    assert frames[-1]["state"] == "promoted"
    assert all(a != b for a, b in itertools.pairwise(frames))  # a line per change, none repeated
    res = run_cli(CLI, "deploy", "clf", "1", "--device", "cam-01", "--device", "cam-02", "--wait", "--timeout", "60",
                  "--interval", "0.3", *h, check=False)
    assert res.returncode == 0, res.stderr
    assert "[##############################] 2/2 devices run clf 1" in res.stdout
    run_cli(CLI, "device", "add", "cam-03", *h, "--out", str(env["home"].parent / "cam-03"))  # never started
    late = run_cli(CLI, "deploy", "clf", "2", "--device", "cam-03", "--wait", "--timeout", "2", *h, check=False)
    assert late.returncode == 1
    assert "1 of 1 device(s) do not run clf 2 yet" in late.stderr and "cam-03: never seen" in late.stderr

