"""Blobs in an S3-compatible object store: the hub's own SigV4 signatures against botocore's,
byte for byte (moto does not verify signatures), a real S3 API (moto_server on a free port)
behind a hub whose /blobs/ answers with a short-lived pre-signed redirect, and an agent's
fetcher following it hop by hop."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import threading
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from edgefleet.agent.adapters.fetch import HttpFetcher
from edgefleet.agent.contract.errors import ConfigError, FetchFailed
from edgefleet.hub.adapters.api import HubHttpServer
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.objectstore import S3Store
from edgefleet.hub.daemon import Hub
from tests.conftest import S3_KEY, S3_SECRET, botocore_s3
from tests.simulator import tiny_model

KEY, SECRET = S3_KEY, S3_SECRET
NOW = dt.datetime(2026, 12, 4, 3, 20, 0, tzinfo=dt.UTC)


def _botocore_client(endpoint: str, region: str = "eu-west-1") -> object:
    return botocore_s3(endpoint, KEY, SECRET, region)


@pytest.mark.parametrize(("bucket", "prefix"), [("models", ""), ("my-bucket", "fleet/a b+c")])
def test_presigned_urls_are_botocores_byte_for_byte(bucket: str, prefix: str) -> None:
    store = S3Store(url=f"s3://{bucket}/{prefix}", endpoint="https://s3.eu-west-1.amazonaws.com:8443",
                    region="eu-west-1", access_key=KEY, secret_key=SECRET, url_ttl_seconds=300)
    sha = hashlib.sha256(b"x").hexdigest()
    ours = store.presign_get(sha, NOW)
    client = _botocore_client("https://s3.eu-west-1.amazonaws.com:8443")
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        theirs = client.generate_presigned_url(  # type: ignore[attr-defined]
            "get_object", Params={"Bucket": bucket, "Key": f"{prefix}/{sha}" if prefix else sha}, ExpiresIn=300)
    assert ours == theirs
    q = parse_qs(urlsplit(ours).query)
    assert q["X-Amz-Expires"] == ["300"] and q["X-Amz-Date"] == ["20261204T032000Z"]


def test_a_signed_put_matches_botocores_authorization_header() -> None:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    store = S3Store(url="s3://models/p", endpoint="http://127.0.0.1:9000", region="us-east-1",
                    access_key=KEY, secret_key=SECRET)
    body, sha = b"model bytes", hashlib.sha256(b"model bytes").hexdigest()
    sent: list[httpx.Request] = []
    store._http = httpx.Client(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    with mock.patch("edgefleet.hub.adapters.objectstore.dt.datetime") as fake:
        fake.now.return_value = NOW
        store._request("PUT", sha, body)
    req = AWSRequest(method="PUT", url=f"http://127.0.0.1:9000/models/p/{sha}", data=body,
                     headers={"x-amz-content-sha256": hashlib.sha256(body).hexdigest()})
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1").add_auth(req)
    assert sent[0].headers["authorization"] == req.headers["Authorization"]


def test_store_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="blob_store must be s3://BUCKET"):
        S3Store(url="https://x/y", endpoint="http://h", region="r", access_key="k", secret_key="s")
    with pytest.raises(ConfigError, match="604800"):
        S3Store(url="s3://b", endpoint="http://h", region="r", access_key="k", secret_key="s", url_ttl_seconds=10**6)


def test_a_hub_on_the_object_store_redirects_agents_to_a_presigned_url(tmp_path: Path, s3: str) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    (home.path / "s3.env").write_text(f"AWS_ACCESS_KEY_ID={KEY}\nAWS_SECRET_ACCESS_KEY={SECRET}\n")
    home.update_config(blob_store="s3://fleet/blobs", s3_endpoint=s3, s3_credentials_file="s3.env")
    hub = Hub(home)
    http = HubHttpServer(hub, "127.0.0.1", 0)
    http.start()
    try:
        model = tiny_model(1.0)
        res = hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(model).decode()}, "alice")
        assert not any(home.blobs.iterdir())  # nothing local: the replicas share the store
        r = httpx.get(f"{http.url}/blobs/{res['sha256']}", follow_redirects=False)
        assert r.status_code == 307 and r.headers["cache-control"] == "no-store"
        loc = r.headers["location"]
        assert loc.startswith(f"{s3}/fleet/blobs/{res['sha256']}?") and "X-Amz-Expires=300" in loc
        # what an agent does: the stable URL, the redirect, the bytes; and a resumed download
        dest = tmp_path / "blob"
        fetcher = HttpFetcher(attempts=1)
        fetcher.fetch(f"{http.url}/blobs/{res['sha256']}", dest, size=len(model))
        assert dest.read_bytes() == model
        dest.write_bytes(model[:100])
        fetcher.fetch(f"{http.url}/blobs/{res['sha256']}", dest, size=len(model))
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == res["sha256"]
        # publishing the same bytes again stores nothing twice; an unknown blob is 404 at the store
        hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(model).decode()}, "alice")
        with pytest.raises(FetchFailed, match="HTTP 404"):
            fetcher.fetch(f"{http.url}/blobs/{'0' * 64}", tmp_path / "none", size=10)
    finally:
        http.stop()
        hub.db.close()


def test_missing_credentials_are_named(tmp_path: Path) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    (home.path / "s3.env").write_text("AWS_ACCESS_KEY_ID=only-the-id\n")
    home.update_config(blob_store="s3://fleet", s3_endpoint="http://127.0.0.1:1", s3_credentials_file="s3.env")
    with pytest.raises(ConfigError, match=r"no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in .*s3.env"):
        Hub(home)


class _Redirector(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target or self.path + "x")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("target", "words"), [("", "more than 3 redirects"), ("file:///etc/passwd", "refused")])
def test_the_fetcher_refuses_redirect_loops_and_other_schemes(tmp_path: Path, target: str, words: str) -> None:
    handler = type("H", (_Redirector,), {"target": target})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FetchFailed, match=words):
            HttpFetcher(attempts=1).fetch(f"http://127.0.0.1:{server.server_port}/blobs/a", tmp_path / "b", size=5)
    finally:
        server.shutdown()
