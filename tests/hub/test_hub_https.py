"""The hub's HTTP server over HTTPS with a certificate from its device CA, on the real thing:
a hub process serving TLS after `edgefleet-hub https-config`, the CLI pinning the home's CA, the
agent's fetcher downloading (and resuming with Range) with the CA pinned, a server certificate
from another CA refused, and an enrolled agent updating through https blob URLs (plain MQTT).
Device groups are checked on the same hub: device add --group, device list, status, deploy
--group."""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.adapters.fetch import HttpFetcher
from edgefleet.agent.contract.config import load_agent_config
from edgefleet.agent.contract.errors import ConfigError, FetchFailed
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.pki import DevicePki
from edgefleet.hub.errors import HubTlsFailed
from tests.conftest import REPO, Broker, Procs, free_port, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _model(path: Path, factor: float) -> None:
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3], [factor] * 3)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "w"], ["y"])], "mul",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@dataclass
class Env:
    tmp: Path
    home: Path
    port: int
    procs: Procs
    blob_sha: str
    blob: bytes

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.pem"

    def cli(self, *argv: str, check: bool = True) -> Any:
        return run_cli("edgefleet.hub.cli.main", *argv, "--home", str(self.home), check=check)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json").stdout))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("https")
    broker = Broker(tmp)
    broker.start()
    procs = Procs(tmp)
    home, port = tmp / "hub", free_port()
    fleet = f"tls{int(time.time() * 1000) % 10**9}"
    try:
        run_cli("edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", fleet, "--broker", broker.url,
                "--http", f"127.0.0.1:{port}", "--public-url", f"http://127.0.0.1:{port}")
        out = json.loads(run_cli("edgefleet.hub.cli.main", "https-config", "--home", str(home), "--json").stdout)
        assert out["public_url"] == f"https://127.0.0.1:{port}"
        procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home))
        ctx = ssl.create_default_context(cafile=str(home / "pki" / "ca.pem"))

        def healthy() -> bool:
            try:
                return httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 20, "hub HTTPS")
        _model(tmp / "m1.onnx", 2.0)
        pub = json.loads(run_cli("edgefleet.hub.cli.main", "publish", "--home", str(home), "--name", "clf",
                                 "--version", "1.0.0", str(tmp / "m1.onnx"), "--json").stdout)
        blob = (home / "blobs" / pub["sha256"]).read_bytes()
        yield Env(tmp, home, port, procs, pub["sha256"], blob)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        broker.stop()


def test_https_config_points_the_hub_at_a_device_ca_certificate(env: Env) -> None:
    doc = tomllib.loads((env.home / "hub.toml").read_text())
    assert doc["http_cert_file"] == "pki/http.pem" and doc["http_key_file"] == "pki/http.key"
    assert doc["public_url"] == f"https://127.0.0.1:{env.port}"
    assert (env.home / "pki" / "http.key").stat().st_mode & 0o077 == 0
    run = json.loads((env.home / "hub.run.json").read_text())
    assert run["http"] == f"https://127.0.0.1:{env.port}"
    # nothing answers in plain HTTP on that port any more
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{env.port}/healthz", timeout=3)
    # the CLI talks to the https hub, verifying it with the home's CA
    assert env.status()["fleet"]


def test_fetcher_downloads_and_resumes_over_https_with_the_pinned_ca(env: Env, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{env.port}/blobs/{env.blob_sha}"
    fetcher = HttpFetcher(pinned_ca=env.ca, pinned_hosts=["127.0.0.1"], attempts=1)
    try:
        whole = tmp_path / "whole"
        fetcher.fetch(url, whole, size=len(env.blob))
        assert hashlib.sha256(whole.read_bytes()).hexdigest() == env.blob_sha
        # Resume: what is already on disk is kept and only the rest is asked for (Range). The
        # marker prefix proves the server answered 206 from the offset, not the whole blob again.
        half = len(env.blob) // 2
        part = tmp_path / "part"
        part.write_bytes(b"\0" * half)
        fetcher.fetch(url, part, size=len(env.blob))
        assert part.read_bytes() == b"\0" * half + env.blob[half:]
    finally:
        fetcher.close()
    # without the pinned CA (system CAs only) the hub's certificate is not trusted
    plain = HttpFetcher(attempts=1)
    with pytest.raises(FetchFailed, match="TLS certificate verification failed") as err:
        plain.fetch(url, tmp_path / "x", size=len(env.blob))
    assert err.value.reason == "tls_untrusted"
    plain.close()


class _Blob(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def foreign_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server whose certificate comes from another CA (same names: 127.0.0.1)."""
    other = DevicePki(tmp_path / "other-pki", "other")
    other.ensure_ca(time.time())
    cert, key = other.issue_server(["127.0.0.1", "localhost"], time.time())
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", other.ca_path
    httpd.shutdown()
    httpd.server_close()


def test_server_certificate_from_another_ca_is_refused(
    env: Env, foreign_server: tuple[str, Path], tmp_path: Path
) -> None:
    url, other_ca = foreign_server
    fetcher = HttpFetcher(pinned_ca=env.ca, pinned_hosts=["127.0.0.1"], attempts=3, backoff=5.0)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match=r"TLS certificate verification failed .*pinned CA") as err:
        fetcher.fetch(f"{url}/blobs/x", tmp_path / "x", size=5)
    assert err.value.reason == "tls_untrusted"
    assert time.monotonic() - started < 5.0  # refused at once, not retried
    assert not (tmp_path / "x").exists()
    fetcher.close()
    # the CLI's client refuses it too, naming the TLS failure instead of "no hub answers"
    client = HubClient.for_home(HubHome(env.home), url)
    with pytest.raises(HubTlsFailed, match="TLS certificate verification failed"):
        client.status()
    client.close()
    # the CA is pinned only for the hub's hosts: another https store is verified as usual
    # (here `verify` stands in for the system CAs, which trust that store)
    other_store = HttpFetcher(pinned_ca=env.ca, pinned_hosts=["hub.example"], attempts=1,
                              verify=ssl.create_default_context(cafile=str(other_ca)))  # type: ignore[arg-type]
    other_store.fetch(f"{url}/blobs/x", tmp_path / "y", size=5)
    assert (tmp_path / "y").read_bytes() == b"hello"
    other_store.close()


def test_enrolled_agent_updates_through_https_blob_urls(env: Env) -> None:
    bundle, agent_port = env.tmp / "dev-h", free_port()
    env.cli("device", "add", "dev-h", "--out", str(bundle), "--listen", f"127.0.0.1:{agent_port}",
            "--window", "1", "--group", "line-a")
    conf = tomllib.loads((bundle / "agent.toml").read_text())
    assert conf["blob_url"] == f"https://127.0.0.1:{env.port}"
    assert conf["ca_file"] == "ca.pem" and conf["broker_url"].startswith("mqtt://")
    assert (bundle / "ca.pem").read_bytes() == env.ca.read_bytes()
    env.procs.start("agent-dev-h", "edgefleet.agent.app.cli", "run", "--config", str(bundle / "agent.toml"))
    env.cli("deploy", "clf", "1.0.0", "--group", "line-a")

    def runs() -> bool:
        dev = next(d for d in env.status()["devices"] if d["device"] == "dev-h")
        return bool(dev["models"].get("clf") == "1.0.0")

    wait_for(runs, 40, "dev-h to report clf 1.0.0 fetched over https")
    r = httpx.post(f"http://127.0.0.1:{agent_port}/v2/models/clf/infer", timeout=10, json={
        "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0]


def test_groups_in_device_list_status_and_deploy(env: Env) -> None:
    for dev, group in (("g-a1", "line-b"), ("g-a2", "line-b"), ("g-c", None)):
        env.cli("device", "add", dev, "--out", str(env.tmp / dev), *(["--group", group] if group else []))
    listed = {d["device"]: d["group"] for d in json.loads(env.cli("device", "list", "--json").stdout)["devices"]}
    assert listed["g-a1"] == "line-b" and listed["g-a2"] == "line-b" and listed["g-c"] is None
    table = env.cli("device", "list").stdout
    assert "GROUP" in table.splitlines()[0]
    assert any(line.split()[:2] == ["g-a1", "line-b"] for line in table.splitlines())
    groups = {d["device"]: d["group"] for d in env.status()["devices"]}
    assert groups["g-a2"] == "line-b" and groups["g-c"] is None
    status_lines = env.cli("status").stdout.splitlines()
    assert status_lines[1].split()[-1] == "GROUP"
    last = {line.split()[0]: line.split()[-1] for line in status_lines[2:]}
    assert last["g-a1"] == "line-b" and last["g-c"] == "-"

    res = json.loads(env.cli("deploy", "clf", "1.0.0", "--group", "line-b", "--device", "g-c",
                             "--json").stdout)
    assert sorted(res["devices"]) == ["g-a1", "g-a2", "g-c"]
    bad = env.cli("deploy", "clf", "1.0.0", "--group", "line-z", check=False)
    assert bad.returncode == 2
    assert "group 'line-z' has no device; known groups: line-a, line-b" in bad.stderr
    bad = env.cli("device", "add", "g-x", "--out", str(env.tmp / "g-x"), "--group", "a/b", check=False)
    assert bad.returncode == 2 and "group id must be 1-64 characters of A-Z a-z 0-9 _ . -" in bad.stderr
    bad = env.cli("deploy", "clf", "1.0.0", "--group", "l+", check=False)
    assert bad.returncode == 2 and "group id must be 1-64 characters" in bad.stderr
    bad = env.cli("deploy", "clf", "1.0.0", check=False)
    assert bad.returncode == 2 and "--device ID and/or --group G" in bad.stderr


def test_agent_toml_pins_ca_file_for_the_hubs_https_blobs(tmp_path: Path) -> None:
    profile = REPO / "device-profiles" / "raspberry-pi-5.toml"
    (tmp_path / "profile.toml").write_text(profile.read_text())
    (tmp_path / "ca.pem").write_text("x")

    def conf(blob_url: str, extra: str = 'ca_file = "ca.pem"\n') -> Path:
        path = tmp_path / "agent.toml"
        path.write_text(f'fleet = "f"\ndevice = "d1"\nbroker_url = "mqtt://broker.lan:1883"\n'
                        f'blob_url = "{blob_url}"\nroot_public_key = "AAAA"\nprofile = "profile.toml"\n{extra}')
        return path

    cfg = load_agent_config(conf("https://Hub.lan:8400"))  # plain MQTT, https blobs: allowed
    assert cfg.fetch_options() == {"pinned_ca": tmp_path / "ca.pem", "pinned_hosts": ["broker.lan", "hub.lan"]}
    assert load_agent_config(conf("https://hub.lan:8400", "")).fetch_options() == {}  # system CAs
    with pytest.raises(ConfigError, match=r"need a TLS broker URL .* or an https blob_url"):
        load_agent_config(conf("http://hub.lan:8400"))  # a CA pinned for nothing
    fetcher = HttpFetcher(**cfg.fetch_options())
    assert fetcher._is_pinned("https://hub.lan:8400/blobs/x")
    assert not fetcher._is_pinned("https://bucket.s3.example/x") and not fetcher._is_pinned("http://hub.lan/x")
