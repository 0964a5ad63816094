"""Where the hub keeps blobs (model versions, preflight sets): the home's folder, or an
S3-compatible object store that hub replicas on separate hosts share.

Blobs are content-addressed (the key is the sha256 of the bytes) and every device checks the
sha256 and size signed into its desired state, so the store needs no integrity of its own and a
blob is never rewritten. Agents always fetch the stable URL in their signed state,
``{public_url}/blobs/{sha256}``; a hub on an object store answers it with a redirect to a
pre-signed GET URL that expires after ``blob_url_ttl_seconds``, so no signed state carries an
expiring link and no replica streams model bytes itself (as Greengrass, Mender and IoT Jobs do).

The S3 requests are signed with AWS Signature Version 4 here, in ~80 lines (the algorithm is
public and fixed; ``tests/hub/test_objectstore.py`` checks the pre-signed URLs against botocore's
byte for byte), rather than through boto3, which would add some 80 MB to every hub install for two
calls. Path-style addressing (``{endpoint}/{bucket}/{key}``), which MinIO, Ceph RGW, GCS interop and
AWS S3 all accept.

``hub.toml``::

    blob_store = "s3://BUCKET/PREFIX"          # empty: HOME/blobs
    s3_endpoint = "https://s3.eu-west-1.amazonaws.com"   # or http://minio:9000
    s3_region = "eu-west-1"
    s3_credentials_file = "/etc/edgefleet/s3.env"   # AWS_ACCESS_KEY_ID=..., AWS_SECRET_ACCESS_KEY=...
    blob_url_ttl_seconds = 300
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

import httpx

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import ConfigError, EdgefleetError

__all__ = ["BlobStore", "FolderStore", "S3Store", "StoreError", "read_credentials"]


class StoreError(EdgefleetError):
    """The object store refused or could not be reached."""


class BlobStore(Protocol):
    def put(self, sha256: str, data: bytes) -> None:
        """Store *data* under its sha256 (a blob already there is left as it is)."""

    def location(self, sha256: str) -> Path | str | None:
        """Where an agent gets the blob: a local file the hub serves, a URL to redirect to, or
        None when there is no such blob."""

    def describe(self) -> str: ...


class FolderStore:
    """The embedded default: ``HOME/blobs``, served by the hub itself (with ``Range`` resume)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, sha256: str, data: bytes) -> None:
        path = self.folder / sha256
        if not path.exists():
            atomic_write(path, data, mode=0o600)

    def location(self, sha256: str) -> Path | None:
        p = self.folder / sha256
        return p if p.is_file() else None

    def describe(self) -> str:
        return str(self.folder)


def read_credentials(path: str) -> tuple[str, str]:
    """``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` from an env-style file (``KEY=value``
    lines), or from the environment when *path* is empty."""
    values: Mapping[str, str] = os.environ
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the object store credentials {path}: {exc}") from exc
        values = {k.strip(): v.strip().strip("'\"") for k, _, v in
                  (line.partition("=") for line in text.splitlines() if "=" in line and not line.startswith("#"))}
    key, secret = values.get("AWS_ACCESS_KEY_ID", ""), values.get("AWS_SECRET_ACCESS_KEY", "")
    if not key or not secret:
        where = path or "the environment"
        raise ConfigError(f"no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in {where} (s3_credentials_file)")
    return key, secret


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class S3Store:
    def __init__(self, *, url: str, endpoint: str, region: str, access_key: str, secret_key: str,
                 url_ttl_seconds: int = 300, timeout: float = 60.0) -> None:
        """*url*: ``s3://BUCKET[/PREFIX]``; *endpoint*: the service's base URL."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"blob_store must be s3://BUCKET[/PREFIX], got {url!r}")
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise ConfigError(f"s3_endpoint must be an http(s) URL, got {endpoint!r}")
        if not 1 <= url_ttl_seconds <= 604800:
            raise ConfigError(f"blob_url_ttl_seconds must be 1..604800 (S3's limit), got {url_ttl_seconds}")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.endpoint, self.host = f"{ep.scheme}://{ep.netloc}", ep.netloc
        self.region, self.ttl = region, url_ttl_seconds
        self._key, self._secret = access_key, secret_key
        self._http = httpx.Client(timeout=timeout)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    def _path(self, sha256: str) -> str:
        key = f"{self.prefix}/{sha256}" if self.prefix else sha256
        return "/" + quote(self.bucket, safe="") + "/" + quote(key, safe="/~")

    def _signing_key(self, datestamp: str) -> bytes:
        k = _hmac(("AWS4" + self._secret).encode(), datestamp)
        for part in (self.region, "s3", "aws4_request"):
            k = _hmac(k, part)
        return k

    def _signature(self, amz_date: str, canonical_request: str) -> tuple[str, str]:
        scope = f"{amz_date[:8]}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical_request.encode()).hexdigest()])
        return scope, hmac.new(self._signing_key(amz_date[:8]), to_sign.encode(), hashlib.sha256).hexdigest()

    def presign_get(self, sha256: str, now: dt.datetime | None = None) -> str:
        """A GET URL for the blob, valid for ``url_ttl_seconds`` from *now* (query-string SigV4)."""
        amz_date = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
        path = self._path(sha256)
        query = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                 "X-Amz-Credential": f"{self._key}/{amz_date[:8]}/{self.region}/s3/aws4_request",
                 "X-Amz-Date": amz_date, "X-Amz-Expires": str(self.ttl), "X-Amz-SignedHeaders": "host"}
        canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
        canonical = "\n".join(["GET", path, canonical_query, f"host:{self.host}\n", "host", "UNSIGNED-PAYLOAD"])
        _, signature = self._signature(amz_date, canonical)
        return f"{self.endpoint}{path}?{canonical_query}&X-Amz-Signature={signature}"

    def _request(self, method: str, sha256: str, body: bytes = b"") -> httpx.Response:
        amz_date = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        payload = hashlib.sha256(body).hexdigest()
        path = self._path(sha256)
        headers = {"host": self.host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, path, "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                               signed, payload])
        scope, signature = self._signature(amz_date, canonical)
        auth = f"AWS4-HMAC-SHA256 Credential={self._key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        try:
            return self._http.request(method, self.endpoint + path, content=body,
                                      headers={**{k: v for k, v in headers.items() if k != "host"},
                                               "Authorization": auth})
        except httpx.HTTPError as exc:
            raise StoreError(f"{method} {self.describe()}/{sha256[:12]}…: {type(exc).__name__}: {exc}") from exc

    def exists(self, sha256: str) -> bool:
        resp = self._request("HEAD", sha256)
        if resp.status_code in (200, 404):
            return resp.status_code == 200
        raise StoreError(f"HEAD {self.describe()}/{sha256[:12]}… answered HTTP {resp.status_code}")

    def put(self, sha256: str, data: bytes) -> None:
        if self.exists(sha256):
            return
        resp = self._request("PUT", sha256, data)
        if resp.status_code != 200:
            raise StoreError(f"PUT {self.describe()}/{sha256[:12]}… answered HTTP {resp.status_code}: "
                             f"{resp.text[:300]}")

    def location(self, sha256: str) -> str:
        return self.presign_get(sha256)
