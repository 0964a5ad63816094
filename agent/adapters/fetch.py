"""Blob download: httpx streaming into the store's partial folder.

The seam is :class:`Fetcher` (one method). :class:`HttpFetcher` hashes while it streams, stops
as soon as more bytes arrive than the signed size, resumes an interrupted download with
``Range``, retries with jittered backoff, and refuses slow retrieval two ways: a total-time
limit that grows with the size, and a minimum average throughput per attempt once a short grace
period has passed (a server dripping a byte per second never trips a read timeout). Slow
downloads fail with reason ``slow_retrieval``. Redirects (a hub keeping blobs in an object store
answers with a pre-signed URL) are followed hop by hop, each with the trust its own host needs. With ``pinned_ca`` (the hub's device CA, agent.toml
``ca_file``) https URLs on the hub's hosts must chain to that CA alone; a refused certificate
fails at once with reason ``tls_untrusted``. It translates httpx and OS errors into
:class:`~agent.contract.errors.FetchFailed`; the store
then checks size and hash once more before the blob becomes visible.
"""

from __future__ import annotations

import contextlib
import random
import ssl
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import httpx

from edgefleet.agent.contract.errors import BlobMismatch, FetchFailed

__all__ = ["MAX_REDIRECTS", "MIN_BYTES_PER_SECOND", "Fetcher", "HttpFetcher", "is_tls_verify_error"]
MAX_REDIRECTS = 3

# The slowest average an attempt may sustain after its grace period: 32 KiB/s (256 kbit/s, a poor
# cellular link) lets a 256 MiB model take up to 2 h 16 min; the previous 1 KiB/s allowed 73 h.
MIN_BYTES_PER_SECOND = 32 * 1024.0


class Fetcher(Protocol):
    def fetch(self, url: str, dest: Path, *, size: int) -> None:
        """Write the ``size`` bytes at ``url`` to ``dest`` (possibly resuming what is there)."""


class HttpFetcher:
    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        total_timeout: float = 300.0,
        min_bytes_per_second: float = MIN_BYTES_PER_SECOND,
        grace_seconds: float = 5.0,
        attempts: int = 4,
        backoff: float = 0.5,
        verify: bool | str = True,
        headers: dict[str, str] | None = None,
        rng: random.Random | None = None,
        pinned_ca: Path | str | None = None,
        pinned_hosts: Collection[str] | None = None,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        """``pinned_ca``: https URLs on ``pinned_hosts`` (every https URL when ``None``) must
        present a certificate chaining to this CA file alone (the hub's device CA); any other
        https store is verified with ``verify`` (the system CAs)."""
        # The client (and its TLS context, ~4 MB of RSS with the CA bundle) is made on the first
        # download: most of an agent's life is serving, not fetching.
        self._client_args: dict[str, object] = {
            "timeout": httpx.Timeout(read_timeout, connect=connect_timeout),
            "verify": verify,
            "headers": headers,
            # redirects are followed by _open, each hop with the client its own URL needs (a hub
            # pinned to the fleet's CA redirects to an object store with a public certificate)
            "follow_redirects": False,
        }
        self._http: httpx.Client | None = None
        self._pinned_http: httpx.Client | None = None
        self.pinned_ca = str(pinned_ca) if pinned_ca is not None else None
        self.pinned_hosts = {h.lower() for h in pinned_hosts} if pinned_hosts is not None else None
        self.total_timeout = total_timeout
        self.min_rate = min_bytes_per_second
        self.grace = grace_seconds
        self.attempts = attempts
        self.backoff = backoff
        self._rng = rng or random.Random()
        self._on_progress = on_progress or (lambda: None)

    @property
    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(**self._client_args)  # type: ignore[arg-type]
        return self._http

    def _is_pinned(self, url: str) -> bool:
        parts = urlsplit(url)
        if self.pinned_ca is None or parts.scheme != "https":
            return False
        return self.pinned_hosts is None or (parts.hostname or "").lower() in self.pinned_hosts

    def _client_for(self, url: str) -> httpx.Client:
        if not self._is_pinned(url):
            return self._client
        if self._pinned_http is None:
            try:
                ctx = ssl.create_default_context(cafile=self.pinned_ca)
            except (OSError, ssl.SSLError) as exc:
                raise FetchFailed(f"cannot load the pinned CA {self.pinned_ca}: {exc}",
                                  reason="tls_untrusted") from exc
            self._pinned_http = httpx.Client(**{**self._client_args, "verify": ctx})  # type: ignore[arg-type]
        return self._pinned_http

    def close(self) -> None:
        for client in (self._http, self._pinned_http):
            if client is not None:
                client.close()

    def fetch(self, url: str, dest: Path, *, size: int) -> None:
        # Time allowed grows with the size, so a slow-drip server cannot hold us forever.
        deadline = time.monotonic() + max(self.total_timeout, size / self.min_rate)
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                self._fetch_once(url, dest, size=size, deadline=deadline)
                return
            except BlobMismatch:
                dest.unlink(missing_ok=True)
                raise
            except FetchFailed as exc:
                last = exc
                if exc.reason == "tls_untrusted":
                    break  # the same certificate will be refused again: no point retrying
            if time.monotonic() >= deadline:
                break
            time.sleep(self.backoff * (2**attempt) * (0.5 + self._rng.random()))
        raise FetchFailed(
            f"download of {url} failed after {attempt + 1} attempt(s): {last}",
            reason=getattr(last, "reason", None),
        )

    def _fetch_once(self, url: str, dest: Path, *, size: int, deadline: float) -> None:
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return
        # Blobs are content-addressed: the bytes on the wire are the bytes hashed, never a
        # compressed form a decoder could inflate past the signed size before it is checked.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with self._open(url, headers) as resp:
                if resp.status_code == 206 and have:
                    mode = "ab"
                elif resp.status_code == 200:
                    mode, have = "wb", 0
                else:
                    raise FetchFailed(f"GET {url} answered HTTP {resp.status_code}")
                encoding = resp.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise FetchFailed(
                        f"GET {url} answered with Content-Encoding {encoding!r} although identity was "
                        "asked for; blobs are fetched as stored (fix the server or CDN configuration)",
                        reason="content_encoding",
                    )
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and have + int(declared) > size:
                    raise BlobMismatch(
                        f"{url} announces {have + int(declared)} bytes, the signed size is {size}",
                        reason="size_mismatch",
                    )
                started, got = time.monotonic(), 0
                with dest.open(mode) as f:
                    for chunk in resp.iter_raw():
                        got += len(chunk)
                        have += len(chunk)
                        if have > size:
                            raise BlobMismatch(
                                f"{url} sent more than the signed {size} bytes; download stopped",
                                reason="size_mismatch",
                            )
                        f.write(chunk)
                        self._on_progress()
                        now = time.monotonic()
                        if now > deadline:
                            raise FetchFailed(
                                f"{url} is too slow: time limit reached at {have} of {size} bytes",
                                reason="slow_retrieval",
                            )
                        elapsed = now - started
                        if elapsed > self.grace and got / elapsed < self.min_rate and have < size:
                            raise FetchFailed(
                                f"{url} is too slow: {got / elapsed:.0f} B/s over {elapsed:.1f} s, "
                                f"the minimum is {self.min_rate:.0f} B/s",
                                reason="slow_retrieval",
                            )
        except httpx.HTTPError as exc:
            if is_tls_verify_error(exc):
                trusted = f"the pinned CA {self.pinned_ca}" if self._is_pinned(url) else "the system CAs"
                raise FetchFailed(
                    f"GET {url}: TLS certificate verification failed ({exc}): the server's "
                    f"certificate does not chain to {trusted}", reason="tls_untrusted",
                ) from exc
            raise FetchFailed(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            with contextlib.suppress(OSError):
                dest.unlink()
            raise FetchFailed(f"writing {dest}: {exc}") from exc
        if have < size:
            raise FetchFailed(f"{url} ended after {have} of {size} bytes")


    @contextlib.contextmanager
    def _open(self, url: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """GET *url*, following up to :data:`MAX_REDIRECTS` redirects (the hub's ``/blobs/`` answers
        one to a pre-signed object store URL when it keeps blobs there); never from https to http."""
        for _ in range(MAX_REDIRECTS + 1):
            with self._client_for(url).stream("GET", url, headers=headers) as resp:
                location = resp.headers.get("location")
                if resp.status_code not in (301, 302, 303, 307, 308) or not location:
                    yield resp
                    return
            target = urljoin(url, location)
            scheme = urlsplit(target).scheme
            if scheme not in ("http", "https") or (urlsplit(url).scheme == "https" and scheme == "http"):
                raise FetchFailed(f"GET {url} redirected to {target[:200]!r}: refused (only http(s), never "
                                  "from https to http)", reason="bad_redirect")
            url = target
        raise FetchFailed(f"GET {url}: more than {MAX_REDIRECTS} redirects", reason="bad_redirect")


def is_tls_verify_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a certificate verification failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
