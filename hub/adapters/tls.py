"""HTTPS for the hub's HTTP server (blobs and admin API) with a certificate from the device CA.

``edgefleet-hub https-config`` (:func:`issue_http_certificate`) issues the server certificate
(``HOME/pki/http.pem`` + ``http.key``, SAN = the public URL's host, localhost and any
``--hostname``), points ``http_cert_file``/``http_key_file`` in hub.toml at them and turns
``public_url`` into ``https://``. The running hub then serves TLS (:func:`server_context`,
handshake in the connection's own thread: :func:`handshake`); blob URLs in desired states are
``https://``; agents pin the device CA from their bundle (``ca_file``), and the CLI pins
``HOME/pki/ca.pem`` (:func:`client_verify`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgefleet.agent.adapters.fetch import is_tls_verify_error
from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.hub.adapters.home import HubConfig, HubHome
from edgefleet.hub.adapters.pki import DevicePki

__all__ = [
    "client_verify",
    "handshake",
    "http_hostnames",
    "is_tls_verify_error",
    "issue_http_certificate",
    "server_context",
]

log = logging.getLogger("edgefleet.hub.adapters.tls")
HANDSHAKE_TIMEOUT = 30.0
WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - listen addresses, not names in a certificate


def server_context(config: HubConfig) -> ssl.SSLContext | None:
    """The TLS context the HTTP server wraps its socket with, or ``None`` for plain HTTP."""
    if not config.http_tls:
        return None
    if not config.http_key_file:
        raise ConfigError("hub.toml: http_cert_file is set but http_key_file is not; "
                          "rerun `edgefleet-hub https-config`")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.http_cert_file, config.http_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"hub.toml: cannot load http_cert_file {config.http_cert_file} / http_key_file "
            f"{config.http_key_file} ({exc}); rerun `edgefleet-hub https-config`"
        ) from exc
    return ctx


def handshake(request: object) -> bool:
    """Finish the TLS handshake of an accepted connection in its handler thread (a slow or
    hostile client never holds up ``accept``). False: drop the connection. The socket's own
    timeout (the server's per-connection timeout) bounds the handshake too, and is kept."""
    if not isinstance(request, ssl.SSLSocket):
        return True
    timeout = request.gettimeout()
    try:
        request.settimeout(min(HANDSHAKE_TIMEOUT, timeout) if timeout else HANDSHAKE_TIMEOUT)
        request.do_handshake()
        request.settimeout(timeout)
    except (OSError, ssl.SSLError) as exc:
        log.info("TLS handshake failed: %s", exc)
        return False
    return True


def client_verify(home: HubHome, url: str) -> ssl.SSLContext | bool:
    """How the CLI verifies the hub at ``url``: the device CA of the home for https (the hub's
    certificate comes from it), the system CAs if the home has no CA, nothing to do for http."""
    if not url.startswith("https://"):
        return True
    ca = home.pki_path / "ca.pem"
    if not ca.is_file():
        return True
    return ssl.create_default_context(cafile=str(ca))


def http_hostnames(config: HubConfig, extra: list[str] | None = None) -> list[str]:
    """Names the certificate must carry: the public URL's host (what devices use), the listen
    host if it is not a wildcard, ``extra``, then localhost (what the CLI on the hub uses)."""
    names: list[str] = []
    public = urlsplit(config.public_url).hostname if config.public_url else None
    listen = config.http_listen.rpartition(":")[0].strip("[]")
    for n in (public, listen if listen not in WILDCARDS else None, *(extra or []),
              "localhost", "127.0.0.1", "::1"):
        if n and n not in names:
            names.append(n)
    if not public and listen in WILDCARDS:
        fqdn = socket.getfqdn()
        if fqdn and fqdn not in names:
            names.append(fqdn)
    return names


def https_public_url(config: HubConfig) -> str:
    """``public_url`` with the https scheme (unchanged when empty: the hub derives it)."""
    if config.public_url.startswith("http://"):
        return "https://" + config.public_url[len("http://"):]
    return config.public_url


def issue_http_certificate(home: HubHome, *, extra_hostnames: list[str] | None, now: float,
                           update_config: bool = True) -> dict[str, Any]:
    """Issue the hub's HTTPS certificate from the device CA and point hub.toml at it."""
    cfg = home.config()
    pki = DevicePki(home.pki_path, cfg.fleet)
    pki.ensure_ca(now)
    names = http_hostnames(cfg, extra_hostnames)
    cert_pem, key_pem = pki.issue_server(names, now)
    cert_path: Path = home.pki_path / "http.pem"
    key_path: Path = home.pki_path / "http.key"
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, cert_pem, mode=0o644)
    public_url = https_public_url(cfg)
    if update_config:
        changes = {"http_cert_file": "pki/http.pem", "http_key_file": "pki/http.key"}
        if public_url != cfg.public_url:
            changes["public_url"] = public_url
        home.update_config(**changes)
    return {"hostnames": names, "cert_file": str(cert_path), "key_file": str(key_path),
            "ca_file": str(pki.ca_path), "public_url": public_url}
