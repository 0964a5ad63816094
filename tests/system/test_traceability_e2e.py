"""Lineage, prediction tracing and the audit chain, end to end on real parts: Mosquitto, the hub
and two agents as processes, models trained here, the CLI as a user runs it.

``dev-cap`` captures every request (profile override sample_rate = 1); ``dev-off`` keeps the
profile default (off). Tests run in file order against one fleet; the tampering test comes last.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.conftest import Broker, Procs, free_port, hub_up, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Env:
    tmp: Path
    home: Path
    ports: dict[str, int]
    X: np.ndarray
    digest_a: str

    def hub(self, *argv: str, check: bool = True) -> Any:
        return run_cli("edgefleet.hub.cli.main", *argv, "--home", str(self.home), check=check)

    def json(self, *argv: str) -> Any:
        return json.loads(self.hub(*argv, "--json").stdout)

    def infer(self, dev: str, rows: np.ndarray, rid: str) -> dict[str, Any]:
        body = {"id": rid, "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                       "data": rows.reshape(-1).tolist()}]}
        r = httpx.post(f"http://127.0.0.1:{self.ports[dev]}/v2/models/clf/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("trace")
    broker = Broker(tmp)
    broker.start()
    procs = Procs(tmp)
    home = tmp / "hub"
    http_port = free_port()
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", f"tr{int(time.time() * 1000) % 10**9}",
            "--broker", broker.url, "--http", f"127.0.0.1:{http_port}")
    procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home))
    try:
        wait_for(lambda: hub_up(http_port), 20, "hub HTTP")
        ports = {}
        for dev, extra in (("dev-cap", ["--capture", "1"]), ("dev-off", [])):
            ports[dev] = free_port()
            run_cli("edgefleet.hub.cli.main", "device", "add", dev, "--home", str(home), "--out", str(tmp / dev),
                    "--listen", f"127.0.0.1:{ports[dev]}", "--window", "1", *extra)
        cfg = tmp / "dev-cap" / "agent.toml"
        assert cfg.read_text().rstrip().endswith("sample_rate = 1.0")
        with cfg.open("a") as f:
            f.write("upload_seconds = 0.3\n")  # same [overrides.capture] table: upload quickly
        for dev in ports:
            procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config", str(tmp / dev / "agent.toml"))

        rng = np.random.default_rng(11)
        X = rng.normal(size=(600, 4)).astype(np.float32)
        y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
        Xb = X.copy()
        Xb[:, 0] += 2.0  # version B is trained on data whose feature 0 moved
        np.save(tmp / "train_a.npy", X)
        np.save(tmp / "train_b.npy", Xb)
        (tmp / "a.pkl").write_bytes(pickle.dumps(LogisticRegression().fit(X, y)))
        (tmp / "b.pkl").write_bytes(pickle.dumps(LogisticRegression(C=0.1).fit(Xb, y)))
        (tmp / "metrics_b.json").write_text(json.dumps({"auc": 0.93, "f1": 0.84}))
        yield Env(tmp=tmp, home=home, ports=ports, X=X,
                  digest_a=hashlib.sha256((tmp / "train_a.npy").read_bytes()).hexdigest())
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        broker.stop()


def test_publish_records_metrics_tags_source_parent_and_reference(env: Env) -> None:
    t = env.tmp
    env.hub("publish", "--name", "clf", "--version", "1.0.0", str(t / "a.pkl"), "--reference",
            str(t / "train_a.npy"), "--source", "git:abc123", "--metric", "auc=0.91", "--metric",
            "f1=0.80", "--tag", "team=credit-risk", "--tag", "approval=CR-7", "--author", "alice")
    env.hub("publish", "--name", "clf", "--version", "1.1.0", str(t / "b.pkl"), "--reference",
            str(t / "train_b.npy"), "--source", "git:def456", "--metrics", str(t / "metrics_b.json"),
            "--parent", "1.0.0", "--author", "bob")
    m = env.json("models", "show", "clf:1.0.0")
    lin = m["lineage"]
    assert (m["name"], m["version"], len(m["sha256"])) == ("clf", "1.0.0", 64)
    assert lin["metrics"] == {"auc": 0.91, "f1": 0.8}
    assert lin["tags"] == {"team": "credit-risk", "approval": "CR-7"}
    assert (lin["source"], lin["author"], lin["parent"]) == ("git:abc123", "alice", None)
    assert lin["training_data_sha256"] == env.digest_a and lin["training_rows"] == 600
    assert m["reference"]["rows"] == 600 and len(m["reference"]["features"]) == 4
    assert m["inputs"][0]["name"] == "input" and m["created_at"]
    newest = env.json("models", "show", "clf")
    assert newest["version"] == "1.1.0" and newest["lineage"]["parent"] == "1.0.0"
    assert newest["lineage"]["metrics"] == {"auc": 0.93, "f1": 0.84}
    listed = env.json("models", "list")["models"]
    assert [x["version"] for x in listed] == ["1.0.0", "1.1.0"]
    bad = env.hub("publish", "--name", "clf", "--version", "1.2.0", str(t / "a.pkl"), "--parent", "0.9",
                  check=False)
    assert bad.returncode == 2 and "parent version '0.9'" in bad.stderr


def test_diff_reports_psi_between_the_two_training_references(env: Env) -> None:
    d = env.json("models", "diff", "clf", "1.0.0", "1.1.0")
    assert d["signature"]["same"] is True
    assert d["metrics"]["auc"]["delta"] == pytest.approx(0.02)
    psi = [f["psi"] for f in d["reference"]["features"]]
    assert psi[0] > 0.25, psi  # the moved feature
    assert max(psi[1:]) < 0.05, psi
    text = env.hub("models", "diff", "clf", "1.0.0", "1.1.0").stdout
    assert "reference PSI" in text and "alarm" in text


def test_versions_are_immutable_same_bytes_is_a_no_op(env: Env) -> None:
    before = env.json("models", "show", "clf:1.0.0")
    clash = env.hub("publish", "--name", "clf", "--version", "1.0.0", str(env.tmp / "b.pkl"), check=False)
    assert clash.returncode == 2 and "immutable" in clash.stderr
    again = json.loads(env.hub("publish", "--name", "clf", "--version", "1.0.0", str(env.tmp / "a.pkl"),
                               "--json").stdout)
    assert again["already_published"] is True
    assert env.json("models", "show", "clf:1.0.0") == before
    publishes = [e for e in env.json("audit")["entries"] if e["action"] == "publish"]
    assert len(publishes) == 2


def test_captured_prediction_traces_to_version_training_data_and_deploy(env: Env) -> None:
    env.hub("deploy", "clf", "1.0.0", "--device", "dev-cap", "--device", "dev-off", "--json")

    def active() -> bool:
        st = env.json("status")
        return all(d["models"].get("clf") == "1.0.0" for d in st["devices"])

    wait_for(active, 30, "both agents to run clf 1.0.0")
    rows = env.X[:2]
    res = env.infer("dev-cap", rows, "loan-42")
    assert (res["model_version"], res["id"], res["parameters"]["request_id"]) == ("1.0.0", "loan-42", "loan-42")
    env.infer("dev-off", rows, "loan-43")

    def traced() -> Any:
        r = env.hub("trace", "--device", "dev-cap", "--request", "loan-42", "--json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    t = wait_for(traced, 20, "the capture of loan-42 to reach the hub")
    assert isinstance(t, dict)
    (tr,) = t["traces"]
    rec, model, decision = tr["record"], tr["model"], tr["decision"]
    assert (rec["model"], rec["version"]) == ("clf", "1.0.0")
    assert rec["sha256"].startswith(res["parameters"]["sha256"])
    assert np.allclose(rec["inputs"]["input"]["data"], rows.reshape(-1))
    label = next(o for o in res["outputs"] if o["name"] == "label")
    assert rec["outputs"]["label"]["data"] == label["data"]
    assert model["lineage"]["training_data_sha256"] == env.digest_a
    assert model["lineage"]["source"] == "git:abc123"
    assert decision["action"] == "deploy"
    assert decision["details"]["device"] == "dev-cap" and decision["details"]["version"] == "1.0.0"
    assert t["audit_chain_ok"] is True
    text = env.hub("trace", "--device", "dev-cap", "--request", "loan-42").stdout
    assert "put there by audit #" in text and env.digest_a in text


def test_capture_off_stores_nothing(env: Env) -> None:
    # dev-cap's capture (sent after dev-off's request) has arrived, so dev-off had its chance.
    miss = env.hub("trace", "--device", "dev-off", "--request", "loan-43", check=False)
    assert miss.returncode == 2 and "no captured request" in miss.stderr
    assert not (env.tmp / "dev-off" / "state" / "capture").exists()
    con = sqlite3.connect(f"file:{env.home / 'hub.db'}?mode=ro", uri=True)
    try:
        counts = dict(con.execute("SELECT device, COUNT(*) FROM captures GROUP BY device").fetchall())
    finally:
        con.close()
    assert counts == {"dev-cap": 1}


def test_capture_upload_needs_a_registered_device_and_its_own_token(env: Env) -> None:
    url = json.loads((env.home / "hub.run.json").read_text())["http"]
    body = {"kind": "edgefleet.capture/v1", "fleet": json.loads(env.hub("status", "--json").stdout)["fleet"],
            "device": "intruder", "records": [{"request_id": "x", "time": 1.0, "model": "clf",
                                               "version": "1.0.0", "sha256": "0" * 64,
                                               "inputs": {}, "outputs": {}}]}
    token = {d: (env.tmp / d / "capture.token").read_text().strip() for d in ("dev-off", "dev-cap")}
    # The token is checked before the body is read: without one, nothing about the body matters.
    r = httpx.post(f"{url}/api/v1/capture", json=body, timeout=10)
    assert r.status_code == 401 and "missing or wrong capture token" in r.json()["error"]
    r = httpx.post(f"{url}/api/v1/capture", json=body, headers={"Authorization": f"Bearer {token['dev-off']}"},
                   timeout=10)
    assert r.status_code == 401 and "missing or wrong capture token" in r.json()["error"]
    body["device"] = "dev-off"
    for auth in ({}, {"Authorization": f"Bearer {token['dev-cap']}"}, {"Authorization": "Bearer guess"}):
        r = httpx.post(f"{url}/api/v1/capture", json=body, headers=auth, timeout=10)
        assert r.status_code == 401 and "missing or wrong capture token" in r.json()["error"], auth
    own = {"Authorization": f"Bearer {token['dev-off']}"}
    r = httpx.post(f"{url}/api/v1/capture", json=body, headers=own, timeout=10)
    assert r.status_code == 400 and "not a published version" in r.json()["error"]
    env.hub("device", "revoke", "dev-off")
    r = httpx.post(f"{url}/api/v1/capture", json=body, headers=own, timeout=10)
    assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_tampered_audit_row_fails_verify_and_is_named(env: Env) -> None:
    assert env.hub("audit", "verify").returncode == 0
    entries = env.json("audit")["entries"]
    target = next(e for e in entries if e["action"] == "deploy" and e["details"]["device"] == "dev-cap")
    con = sqlite3.connect(env.home / "hub.db", timeout=10)
    try:
        forged = json.dumps({**target["details"], "version": "1.1.0"}, sort_keys=True, separators=(",", ":"))
        with con:
            con.execute("UPDATE audit SET details=? WHERE id=?", (forged, target["id"]))
    finally:
        con.close()
    res = env.hub("audit", "verify", check=False)
    assert res.returncode == 1
    assert f"row {target['id']} (deploy)" in res.stdout and "modified" in res.stdout
