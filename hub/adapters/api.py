"""The hub's HTTP server: blob downloads (no secret needed: blobs are hashed and signed) and the
authenticated admin API the CLI talks to. Every endpoint but these two needs a token, whose role
(:mod:`hub.core.access`) allows the call: viewer for every GET, operator for publish, deploy,
rollouts and rollback, admin for devices and tokens.

    GET  /healthz                     liveness (no auth)
    GET  /blobs/{sha256}              a published blob (no auth); honours ``Range: bytes=N-`` (resume)

    GET  /metrics                     fleet metrics, Prometheus text format (hub.services.metrics);
                                      without a token on ``metrics_listen`` alone (MetricsHttpServer)
    GET  /api/v1/status?limit=&after= devices, what they run, status, last telemetry; a page of
                                      ``limit`` (default 500, at most 5000) devices after the id
                                      ``after``, by id, with ``next`` (cursor or null) and ``total``
    GET  /api/v1/events?device=&limit=
    GET  /api/v1/models
    GET  /api/v1/models/{name}[/versions/{version}]   one version, with reference and lineage
    GET  /api/v1/models/{name}/diff?a=&b=             signature, metrics, lineage, reference PSI
    GET  /api/v1/trace?device=&request=               a captured prediction, lineage, decision
    GET  /api/v1/audit?since=EPOCH&limit=N   the hash-chained audit log (the newest N)
    GET  /api/v1/audit/verify         walk the chain: {"ok", "problems"}
    GET  /api/v1/drift?model=NAME     drift scores per model version, fleet and device
    GET  /api/v1/drift/view?model=&version=   per feature: live and reference histograms, scores,
                                      their history per bucket, the devices that drift most
    GET  /api/v1/devices/{id}/telemetry?limit=   the device's newest windows (latency, system)
    GET  /api/v1/whoami               the calling token's name and role (what the page may show)
    GET  /ui                          the fleet page (static; it calls the API with a token)
    POST /api/v1/models               publish {name, version, model_b64, reference?, lineage?}
    GET  /api/v1/devices              enrolled devices with their credentials' state
    POST /api/v1/devices              register {device, profile, credentials?}
                                      or {device, cancel}: take back an enrolment whose bundle could
                                      not be written (the one-time secret it returned, 10 min)
                                      (credentials: cert | password | both | none | auto)
    POST /api/v1/devices/revoke       {device}: revoke its certificates and password (CRL, passwd)
    POST /api/v1/deploy               {model, version, devices: [...]}
    GET  /api/v1/rollouts?id=ID|NAME  rollouts (newest first) with progress and the current gate view
    POST /api/v1/rollouts             start {model, version, steps?, mode?, fraction?, policy?, devices?,
                                      dry_run?}
    POST /api/v1/rollouts/action      {action: pause|resume|abort|promote, rollout?: ID or model name}
    POST /api/v1/rollback             fleet rollback {model, to?}
    GET  /api/v1/tokens               named API tokens: name, role, created, revoked (admin)
    POST /api/v1/tokens               {name, role}: a new token, its secret in the answer once (admin)
    POST /api/v1/tokens/revoke        {name} (admin)
    POST /api/v1/capture              device data capture batch (the device's capture token)

Plain HTTP, or HTTPS once ``edgefleet-hub https-config`` has set ``http_cert_file`` in hub.toml
(a certificate from the device CA; :mod:`hub.adapters.tls`). Admin calls need ``Authorization:
Bearer <token>`` (401 without a token the hub knows, or a revoked one; 403 when its role does not
allow the call). The token's name is the actor of the audit entries the call writes; an
``actor`` in the request body is ignored. Errors are ``{"error": message, "reason": code}`` with
the status of :mod:`hub.errors`.

Clients are not trusted to be well-behaved (:mod:`agent.adapters.httpserver`): the credential and
role of a request are checked before any of its body is read; a body is read only with a plain
decimal ``Content-Length`` within the endpoint's limit (:data:`POST_ROUTES`; 411, 400, 413 otherwise, and
501 for ``Transfer-Encoding``); each connection has a socket timeout and at most
``http_max_connections`` are open at once (one more gets 503), both from hub.toml.

The server sees the hub through :class:`Admin`, the operations it serves (the daemon's ``Hub``
provides them); it parses requests and writes responses, and decides nothing itself.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from edgefleet.agent.adapters.httpserver import BoundedHTTPServer, HttpError, QuietHandler, read_body
from edgefleet.agent.contract.errors import ConfigError, EdgefleetError
from edgefleet.hub.adapters.tls import handshake, server_context
from edgefleet.hub.adapters.tokens import TokenStore
from edgefleet.hub.adapters.web import WEB_CSP, web_file
from edgefleet.hub.core.access import Token, allows
from edgefleet.hub.errors import BadRequest, Forbidden, HubRefused, NotFound
from edgefleet.hub.services.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from edgefleet.hub.adapters.home import HubConfig

__all__ = ["Admin", "HubHttpServer", "MetricsHttpServer", "split_listen"]

MiB = 1024 * 1024
# The largest body each POST endpoint reads, checked against Content-Length before reading (413):
# a publish carries the model in base64 (a Jetson profile allows 1 GiB blobs); deploys and
# rollouts carry device lists; the rest a few fields.
MAX_PUBLISH_BODY = 1024 * MiB
MAX_LIST_BODY = 4 * MiB
MAX_SMALL_BODY = 64 * 1024
MAX_CAPTURE_BODY = 16 * MiB  # a device's capture batch (the device's capture token)
# POST endpoint -> (the role it needs, the largest body it reads)
POST_ROUTES = {
    "/api/v1/models": ("operator", MAX_PUBLISH_BODY),
    "/api/v1/deploy": ("operator", MAX_LIST_BODY),
    "/api/v1/rollouts": ("operator", MAX_LIST_BODY),
    "/api/v1/rollouts/action": ("operator", MAX_SMALL_BODY),
    "/api/v1/rollback": ("operator", MAX_SMALL_BODY),
    "/api/v1/devices": ("admin", MAX_SMALL_BODY),
    "/api/v1/devices/revoke": ("admin", MAX_SMALL_BODY),
    "/api/v1/tokens": ("admin", MAX_SMALL_BODY),
    "/api/v1/tokens/revoke": ("admin", MAX_SMALL_BODY),
}
GET_ROLES = {"/api/v1/tokens": "admin"}  # every other GET needs viewer
RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)$")


class Admin(Protocol):
    """The admin API's port onto the hub: one method per operation it serves, plus its tokens
    and config (fleet name, TLS certificate). :class:`edgefleet.hub.daemon.Hub` provides it. Bad
    input raises :class:`hub.errors.HubRefused` (its status and message are the response);
    ``actor`` is who asked: the name of the request's token."""

    @property
    def tokens(self) -> TokenStore: ...

    @property
    def config(self) -> HubConfig: ...

    def metrics(self) -> str: ...  # GET /metrics, Prometheus text (hub.services.metrics)

    def blob_location(self, sha256: str) -> Path | str | None: ...

    def status(self, limit: int | None = None, after: str = "") -> dict[str, Any]: ...

    def events(self, device: str | None, limit: int) -> list[dict[str, Any]]: ...

    def models(self) -> list[dict[str, Any]]: ...

    def model(self, name: str, version: str | None = None) -> dict[str, Any]: ...

    def model_diff(self, name: str, a: str, b: str) -> dict[str, Any]: ...

    def trace(self, device: str, request_id: str) -> dict[str, Any]: ...

    def audit_entries(self, since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]: ...

    def verify_audit(self) -> list[str]: ...

    def drift_snapshot(self, model: str | None = None) -> dict[str, Any]: ...

    def drift_view(self, model: str, version: str | None = None) -> dict[str, Any]: ...

    def device_telemetry(self, device: str, limit: int) -> dict[str, Any]: ...

    def list_devices(self) -> list[dict[str, Any]]: ...

    def publish(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]: ...

    def add_device(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]: ...

    def revoke_device(self, device: str, actor: str) -> dict[str, Any]: ...

    def deploy(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]: ...

    def rollout_status(self, key: str | None = None) -> list[dict[str, Any]]: ...

    def start_rollout(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]: ...

    def rollout_action(self, action: str, key: str | None, actor: str, reason: str = "") -> dict[str, Any]: ...

    def fleet_rollback(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]: ...

    def list_tokens(self) -> list[dict[str, Any]]: ...

    def add_token(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]: ...

    def revoke_token(self, name: str, actor: str) -> dict[str, Any]: ...

    def capture_device(self, authorization: str) -> str: ...  # the capture token's device, or NotAuthorized

    def ingest_capture(self, device: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


class _Handler(QuietHandler):
    server: _Server

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, indent=1).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: int, text: str, content_type: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, exc: EdgefleetError | HttpError) -> None:
        if self._has_unread_body():
            self.close_connection = True  # its bytes must not be parsed as the next request
        if isinstance(exc, HttpError):
            self._json(exc.status, {"error": str(exc), "reason": "body_refused"})
        else:
            self._json(exc.status if isinstance(exc, HubRefused) else 400, {"error": str(exc), "reason": exc.reason})

    def _has_unread_body(self) -> bool:
        if getattr(self, "_body_read", False):
            return False
        return bool(self.headers.get("Transfer-Encoding")) or self.headers.get("Content-Length", "0").strip() != "0"

    def _ui(self, path: str) -> None:
        """The fleet page (hub.adapters.web): static files, no data and no secret in them. The page
        asks for a token and sends it as a Bearer header to the API like the CLI; it is kept in
        the tab's sessionStorage, never in a URL."""
        name = path[len("/ui/"):] if path.startswith("/ui/") else ""
        page = web_file(name or "index.html")
        if page is None:
            raise NotFound(f"no such page: {path}")
        body, content_type = page
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Security-Policy", WEB_CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(body)

    def _auth(self, need: str) -> Token:
        """The request's token (401 without a valid one), if its role allows ``need`` (403)."""
        token = self.server.admin.tokens.authenticate(self.headers.get("Authorization", ""))
        if not allows(token.role, need):
            raise Forbidden(f"token {token.name!r} has role {token.role}; {self.command} {urlsplit(self.path).path} "
                            f"needs {need}" + (" or admin" if need == "operator" else "")
                            + " (an admin can make one: `edgefleet-hub token add NAME --role ROLE`)")
        return token

    def _body(self, limit: int) -> dict[str, Any]:
        """The request's JSON object; call it only once the request's credential is checked."""
        raw = read_body(self, limit)
        self._body_read = True
        try:
            obj = json.loads(raw or b"{}")
        except ValueError as exc:
            raise BadRequest(f"request body is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise BadRequest("request body must be a JSON object")
        return obj

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        hub = self.server.admin
        self._body_read = False
        if self._has_unread_body():
            self.close_connection = True  # a GET's body is never read
        try:
            if url.path == "/healthz":
                return self._json(200, {"ok": True, "fleet": hub.config.fleet})
            if url.path.startswith("/blobs/"):
                return self._blob(url.path[len("/blobs/"):])
            if url.path == "/ui" or url.path.startswith("/ui/"):
                return self._ui(url.path)
            # everything else names devices, their states and what they run
            token = self._auth(GET_ROLES.get(url.path, "viewer"))
            if url.path == "/api/v1/whoami":
                return self._json(200, {"name": token.name, "role": token.role, "fleet": hub.config.fleet,
                                        "can_operate": allows(token.role, "operator")})
            if url.path == "/metrics":
                return self._text(200, hub.metrics(), METRICS_CONTENT_TYPE)
            q = parse_qs(url.query)
            if url.path == "/api/v1/status":
                raw = q.get("limit", [None])[0]
                try:
                    limit = None if raw is None else int(raw)
                except ValueError:
                    raise BadRequest(f"limit must be an integer (devices per page), got {raw!r}") from None
                return self._json(200, hub.status(limit, q.get("after", [""])[0]))
            if url.path == "/api/v1/events":
                limit = int(q.get("limit", ["100"])[0])
                return self._json(200, {"events": hub.events(q.get("device", [None])[0], limit)})
            if url.path == "/api/v1/models":
                return self._json(200, {"models": hub.models()})
            if url.path == "/api/v1/devices":
                return self._json(200, {"devices": hub.list_devices()})
            if url.path == "/api/v1/audit":
                since, newest = q.get("since", [None])[0], q.get("limit", [None])[0]
                return self._json(200, {"entries": hub.audit_entries(float(since) if since else None,
                                                                     int(newest) if newest else None)})
            if url.path == "/api/v1/drift":
                return self._json(200, hub.drift_snapshot(q.get("model", [None])[0]))
            if url.path == "/api/v1/drift/view" and "model" in q:
                return self._json(200, hub.drift_view(q["model"][0], q.get("version", [None])[0]))
            if url.path.startswith("/api/v1/devices/") and url.path.endswith("/telemetry"):
                device = unquote(url.path[len("/api/v1/devices/"):-len("/telemetry")])
                limit = int(q.get("limit", ["60"])[0])
                return self._json(200, hub.device_telemetry(device, limit))
            if url.path.startswith("/api/v1/models/"):
                parts = [unquote(p) for p in url.path[len("/api/v1/models/"):].split("/")]
                if len(parts) == 1:
                    return self._json(200, hub.model(parts[0]))
                if len(parts) == 3 and parts[1] == "versions":
                    return self._json(200, hub.model(parts[0], parts[2]))
                if len(parts) == 2 and parts[1] == "diff" and "a" in q and "b" in q:
                    return self._json(200, hub.model_diff(parts[0], q["a"][0], q["b"][0]))
            if url.path == "/api/v1/trace" and "device" in q and "request" in q:
                return self._json(200, hub.trace(q["device"][0], q["request"][0]))
            if url.path == "/api/v1/rollouts":
                return self._json(200, {"rollouts": hub.rollout_status(q.get("id", [None])[0])})
            if url.path == "/api/v1/audit/verify":
                problems = hub.verify_audit()
                return self._json(200, {"ok": not problems, "problems": problems})
            if url.path == "/api/v1/tokens":
                return self._json(200, {"tokens": hub.list_tokens()})
            raise NotFound(f"no such endpoint: GET {url.path}")
        except EdgefleetError as exc:
            self._error(exc)
        except ValueError as exc:  # a query parameter that is not a number
            self._error(BadRequest(f"bad query in GET {url.path}: {exc}"))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        hub = self.server.admin
        self._body_read = False
        try:
            if url.path == "/api/v1/capture":  # the device's capture token, checked before the body
                device = hub.capture_device(self.headers.get("Authorization", ""))
                return self._json(200, hub.ingest_capture(device, self._body(MAX_CAPTURE_BODY)))
            route = POST_ROUTES.get(url.path)
            token = self._auth(route[0] if route else "viewer")
            if route is None:
                raise NotFound(f"no such endpoint: POST {url.path}")
            body = self._body(route[1])
            body.pop("actor", None)  # who acts is the token, not what the request says
            actor = token.name
            if url.path == "/api/v1/models":
                return self._json(201, hub.publish(body, actor))
            if url.path == "/api/v1/devices":
                return self._json(201, hub.add_device(body, actor))
            if url.path == "/api/v1/devices/revoke":
                return self._json(200, hub.revoke_device(str(body.get("device")), actor))
            if url.path == "/api/v1/deploy":
                return self._json(200, hub.deploy(body, actor))
            if url.path == "/api/v1/rollouts":
                return self._json(201, hub.start_rollout(body, actor))
            if url.path == "/api/v1/rollouts/action":
                return self._json(200, hub.rollout_action(str(body.get("action")), body.get("rollout"), actor,
                                                          str(body.get("reason") or "")))
            if url.path == "/api/v1/rollback":
                return self._json(200, hub.fleet_rollback(body, actor))
            if url.path == "/api/v1/tokens":
                return self._json(201, hub.add_token(body, actor))
            if url.path == "/api/v1/tokens/revoke":
                return self._json(200, hub.revoke_token(str(body.get("name")), actor))
            raise NotFound(f"no such endpoint: POST {url.path}")
        except (EdgefleetError, HttpError) as exc:
            self._error(exc)

    def _blob(self, sha256: str) -> None:
        path = self.server.admin.blob_location(sha256)
        if path is None:
            raise NotFound(f"no blob {sha256[:64]!r}")
        if isinstance(path, str):  # in the object store: a short-lived pre-signed URL
            self.send_response(307)
            self.send_header("Location", path)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        status = 200
        if rng:
            m = RANGE_RE.match(rng.strip())
            if m and int(m.group(1)) < size:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                status = 206
            else:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with path.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class _MetricsHandler(QuietHandler):
    """``GET /metrics`` and nothing else, without a token: the ``metrics_listen`` port."""

    server: _MetricsServer

    def do_GET(self) -> None:
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
            self.close_connection = True  # a GET's body is never read
        if urlsplit(self.path).path == "/metrics":
            status, body, ctype = 200, self.server.render().encode(), METRICS_CONTENT_TYPE
        else:
            status, ctype = 404, "text/plain; charset=utf-8"
            body = b"this port serves GET /metrics only; the admin API is on the hub's http_listen\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _MetricsServer(BoundedHTTPServer):
    render: Callable[[], str]


class MetricsHttpServer:
    """The Prometheus page alone, unauthenticated, on its own address (hub.toml ``metrics_listen``,
    e.g. ``127.0.0.1:9108``): for a scraper that should hold no token. Plain HTTP; bind it to
    loopback or a private interface, since the page names every device and its state."""

    def __init__(self, render: Callable[[], str], host: str, port: int, *, max_connections: int = 16,
                 timeout: float = 10.0) -> None:
        self._httpd = _MetricsServer((host, port), _MetricsHandler, max_connections=max_connections,
                                     timeout=timeout)
        self._httpd.render = render
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        host = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host  # noqa: S104
        return f"http://{host}:{port}/metrics"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Server(BoundedHTTPServer):
    admin: Admin

    def finish_request(self, request: Any, client_address: Any) -> None:
        if handshake(request):  # TLS (hub.tls): the handshake runs in this connection's thread
            super().finish_request(request, client_address)


def split_listen(listen: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → ``(host, port)``; an empty host is 127.0.0.1."""
    host, _, port = listen.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{what} must be HOST:PORT, got {listen!r}") from None
    return host.strip("[]") or "127.0.0.1", number


class HubHttpServer:
    """``max_connections`` and ``timeout`` default to hub.toml's ``http_max_connections`` and
    ``http_timeout_seconds``."""

    def __init__(self, admin: Admin, host: str, port: int, *, max_connections: int | None = None,
                 timeout: float | None = None) -> None:
        cfg = admin.config
        self._httpd = _Server((host, port), _Handler,
                              max_connections=max_connections or cfg.http_max_connections,
                              timeout=timeout or cfg.http_timeout_seconds)
        self._httpd.admin = admin
        self._thread: threading.Thread | None = None
        tls = server_context(admin.config)  # https when hub.toml names a certificate (hub.tls)
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self.scheme = "https" if tls is not None else "http"

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the server (a wildcard listen → 127.0.0.1)."""
        host, port = self.address
        host = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host  # noqa: S104
        return f"{self.scheme}://{host}:{port}"

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
