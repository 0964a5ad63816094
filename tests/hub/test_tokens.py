"""Named API tokens with roles (viewer, operator, admin) on a real hub behind its real HTTP
server: who may do what, who the audit log says acted, revocation, the token file, the CLI."""

from __future__ import annotations

import hashlib
import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.tokens import TokenStore
from edgefleet.hub.daemon import Hub
from edgefleet.hub.errors import NotAuthorized
from tests.conftest import run_cli
from tests.hub._served import Served, serve

DEPLOY = {"model": "m", "version": "1", "devices": ["d1"]}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as s:
        yield s


def make(s: Served, name: str, role: str) -> str:
    r = s.post("/api/v1/tokens", {"name": name, "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def audit(s: Served) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = s.get("/api/v1/audit").json()["entries"]
    return entries


def test_a_home_from_before_named_tokens_keeps_its_admin_token(tmp_path: Path) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    home.tokens_path.unlink(missing_ok=True)  # what an older `init` left: admin.token alone
    secret = home.token()
    hub = Hub(home)
    try:
        doc = json.loads(home.tokens_path.read_text())
        assert [(t["name"], t["role"]) for t in doc["tokens"]] == [("admin", "admin")]
        assert doc["tokens"][0]["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in home.tokens_path.read_text(), "the token file must hold hashes only"
        assert stat.S_IMODE(home.tokens_path.stat().st_mode) == 0o600
        assert hub.tokens.authenticate(f"Bearer {secret}").name == "admin"
        assert home.token() == secret  # admin.token stays: the CLI on this machine reads it
    finally:
        hub.db.close()


def test_a_viewer_reads_but_cannot_deploy(served: Served) -> None:
    viewer = make(served, "grafana", "viewer")
    assert served.get("/api/v1/status", token=viewer).status_code == 200
    assert served.get("/metrics", token=viewer).status_code == 200
    r = served.post("/api/v1/deploy", DEPLOY, token=viewer)
    assert r.status_code == 403, r.text
    assert r.json()["reason"] == "forbidden"
    assert r.json()["error"].startswith("token 'grafana' has role viewer; POST /api/v1/deploy needs operator or admin")
    assert served.get("/api/v1/tokens", token=viewer).status_code == 403
    # refused on its headers: a viewer cannot make the hub read a body either
    sock = socket.create_connection(served.http.address, timeout=5)
    sock.sendall(f"POST /api/v1/models HTTP/1.1\r\nHost: x\r\n{served.auth(viewer)}Content-Length: {2**30}\r\n\r\n"
                 .encode() + b"\0" * 1000)
    sock.settimeout(2)
    assert sock.recv(100).startswith(b"HTTP/1.1 403 ")
    sock.close()


def test_an_operator_deploys_but_cannot_enrol_devices_or_make_tokens(served: Served) -> None:
    op = make(served, "ci", "operator")
    assert served.post("/api/v1/deploy", DEPLOY, token=op).status_code == 200
    for path, body in (("/api/v1/devices", {"device": "d2"}), ("/api/v1/devices/revoke", {"device": "d1"}),
                       ("/api/v1/tokens", {"name": "x", "role": "admin"}), ("/api/v1/tokens/revoke", {"name": "admin"})):
        r = served.post(path, body, token=op)
        assert r.status_code == 403 and "needs admin" in r.json()["error"], (path, r.text)
    admin = make(served, "alice", "admin")
    assert served.post("/api/v1/devices", {"device": "d2"}, token=admin).status_code == 201


def test_the_audit_actor_is_the_token_name_whatever_the_body_says(served: Served) -> None:
    op = make(served, "ci", "operator")
    r = served.post("/api/v1/deploy", {**DEPLOY, "actor": "mallory"}, token=op)
    assert r.status_code == 200, r.text
    entries = audit(served)
    assert [(e["actor"], e["action"]) for e in entries[-2:]] == [("admin", "token_add"), ("ci", "deploy")]
    assert all(e["actor"] != "mallory" for e in entries)


def test_a_revoked_token_is_refused(served: Served) -> None:
    op = make(served, "ci", "operator")
    r = served.post("/api/v1/tokens/revoke", {"name": "ci"})
    assert r.status_code == 200 and r.json()["revoked_at"], r.text
    r = served.get("/api/v1/status", token=op)
    assert r.status_code == 401 and "token 'ci' was revoked at" in r.json()["error"], r.text
    assert served.post("/api/v1/deploy", DEPLOY, token=op).status_code == 401
    again = make(served, "ci", "operator")  # a revoked name may be given again, with a new token
    assert served.get("/api/v1/status", token=again).status_code == 200
    assert served.get("/api/v1/status", token=op).status_code == 401
    assert [e["action"] for e in audit(served)][-3:] == ["token_add", "token_revoke", "token_add"]


def test_the_last_admin_token_cannot_be_revoked(served: Served) -> None:
    r = served.post("/api/v1/tokens/revoke", {"name": "admin"})
    assert r.status_code == 409 and "last admin token" in r.json()["error"], r.text
    root = make(served, "root2", "admin")
    assert served.post("/api/v1/tokens/revoke", {"name": "admin"}, token=root).status_code == 200
    assert served.get("/api/v1/status").status_code == 401  # admin.token's token is gone
    listed = {t["name"]: t for t in served.get("/api/v1/tokens", token=root).json()["tokens"]}
    assert listed["admin"]["revoked_at"] and listed["root2"]["revoked_at"] is None
    assert all("sha256" not in t and "token" not in t for t in listed.values())


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"name": "a/b", "role": "viewer"}, 400, "token name must be 1-64 characters"),
    ({"name": "rollout-gate", "role": "admin"}, 400, "reserved"),
    ({"name": "x", "role": "god"}, 400, "role must be one of viewer, operator, admin"),
    ({"name": "admin", "role": "viewer"}, 409, "token 'admin' exists"),
])
def test_token_names_and_roles_are_checked(served: Served, body: dict[str, str], code: int, words: str) -> None:
    r = served.post("/api/v1/tokens", body)
    assert r.status_code == code and words in r.json()["error"], r.text


def test_every_hub_process_on_the_home_sees_a_change_at_its_next_request(served: Served) -> None:
    home = served.hub.home
    other = TokenStore(home.tokens_path, home.token_path)  # what a replica on the same home holds
    assert other.authenticate(f"Bearer {served.token}").name == "admin"
    op = make(served, "ci", "operator")
    assert other.authenticate(f"Bearer {op}").role == "operator"
    served.post("/api/v1/tokens/revoke", {"name": "ci"})
    with pytest.raises(NotAuthorized, match="revoked"):
        other.authenticate(f"Bearer {op}")


def test_the_cli_makes_lists_and_revokes_tokens_and_sends_edgefleet_token(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ("--home", str(served.hub.home.path), "--hub", served.url)
    out = run_cli("edgefleet.hub.cli.main", "token", "add", "ci", "--role", "viewer", *base).stdout
    secret = out.splitlines()[1]
    assert "shown this once" in out and len(secret) >= 40
    assert secret not in served.hub.home.tokens_path.read_text()
    listed = run_cli("edgefleet.hub.cli.main", "token", "list", *base).stdout
    assert any(line.split()[:2] == ["ci", "viewer"] for line in listed.splitlines()), listed
    monkeypatch.setenv("EDGEFLEET_TOKEN", secret)
    assert "fleet f" in run_cli("edgefleet.hub.cli.main", "status", *base).stdout
    res = run_cli("edgefleet.hub.cli.main", "deploy", "m", "1", "--device", "d1", *base, check=False)
    assert res.returncode == 2 and "hub answered 403: token 'ci' has role viewer" in res.stderr, res.stderr
    monkeypatch.delenv("EDGEFLEET_TOKEN")
    assert "revoked" in run_cli("edgefleet.hub.cli.main", "token", "revoke", "ci", *base).stdout
    monkeypatch.setenv("EDGEFLEET_TOKEN", secret)
    res = run_cli("edgefleet.hub.cli.main", "status", *base, check=False)
    assert res.returncode == 2 and "hub answered 401: token 'ci' was revoked" in res.stderr, res.stderr
