"""Admin API client used by the CLI (and usable from a laptop against a remote hub).

The token it sends: ``$EDGEFLEET_TOKEN`` when set (a named token from ``edgefleet-hub token
add``), else the hub home's ``admin.token``.

``--hub URL1,URL2,...`` names several hub replicas: a request goes to the first that accepts the
connection (and the client stays with it). Only a refused or timed-out *connection* moves on, so
a request that may have reached a replica is never sent to a second one.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.tls import client_verify, is_tls_verify_error
from edgefleet.hub.errors import BY_STATUS, HubNotRunning, HubRefused, HubTlsFailed

__all__ = ["TOKEN_ENV", "HubClient"]

TOKEN_ENV = "EDGEFLEET_TOKEN"  # noqa: S105 - the name of an environment variable


class UploadBody:
    """A request body sent in chunks, calling ``on_progress(sent, total)`` after each: httpx
    streams it (the caller sets Content-Length, which the hub requires). Iterable more than once,
    so a request that never left (a refused connection moved to the next replica) starts over."""

    CHUNK = 256 * 1024

    def __init__(self, data: bytes, on_progress: Callable[[int, int], None]) -> None:
        self.data, self.on_progress = data, on_progress

    def __iter__(self) -> Iterator[bytes]:
        total = len(self.data)
        for start in range(0, total, self.CHUNK):
            chunk = self.data[start:start + self.CHUNK]
            yield chunk
            self.on_progress(start + len(chunk), total)


class HubClient:
    def __init__(self, url: str, token: str, *, timeout: float = 120.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        """*url*: one admin API URL, or several separated by commas (hub replicas)."""
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        if not self.urls:
            raise HubNotRunning(f"no hub URL in {url!r}")
        self.url = self.urls[0]
        self._args: dict[str, Any] = {"headers": {"Authorization": f"Bearer {token}"}, "timeout": timeout,
                                      "verify": verify}
        self._http = httpx.Client(base_url=self.url, **self._args)

    @classmethod
    def for_home(cls, home: HubHome, url: str | None = None) -> HubClient:
        """An https hub is verified against the home's device CA (hub.tls). The token is
        ``$EDGEFLEET_TOKEN`` if set, else ``HOME/admin.token``."""
        url = url or home.api_url()
        token = os.environ.get(TOKEN_ENV, "").strip() or home.token()
        return cls(url, token, verify=client_verify(home, url.split(",")[0].strip()))

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The request on the current replica, or on the next ones while connections are refused."""
        start = self.urls.index(self.url)
        for i in range(len(self.urls)):
            try:
                return self._http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if i == len(self.urls) - 1:
                    raise
            self._http.close()
            self.url = self.urls[(start + i + 1) % len(self.urls)]
            self._http = httpx.Client(base_url=self.url, **self._args)
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._send(method, path, **kw)
        except httpx.TransportError as exc:
            if is_tls_verify_error(exc):
                raise HubTlsFailed(
                    f"TLS certificate verification failed for {self.url}: {exc}; the hub's "
                    "certificate must come from the device CA in HOME/pki/ca.pem "
                    "(rerun `edgefleet-hub https-config` and restart the hub)"
                ) from exc
            where = self.url if len(self.urls) == 1 else f"any of {', '.join(self.urls)}"
            raise HubNotRunning(
                f"no hub answers at {where} ({type(exc).__name__}); start it with "
                "`edgefleet-hub serve --home DIR`"
            ) from exc
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:300]}
        if resp.status_code >= 400:
            cls = BY_STATUS.get(resp.status_code, HubRefused)
            raise cls(f"hub answered {resp.status_code}: {body.get('error', body)}")
        return body

    def status(self, page: int | None = None) -> dict[str, Any]:
        """The whole fleet's status, fetched page by page (``page`` devices each; the hub's default
        without it): one answer with every device, the counters of the last page."""
        params: dict[str, Any] = {} if page is None else {"limit": page}
        result: dict[str, Any] = self.request("GET", "/api/v1/status", params=params)
        devices = list(result["devices"])
        while result.get("next"):
            result = self.request("GET", "/api/v1/status", params={**params, "after": result["next"]})
            devices.extend(result["devices"])
        return {**result, "devices": devices, "next": None}

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        resp = self._send("GET", "/metrics")
        if resp.status_code >= 400:
            raise BY_STATUS.get(resp.status_code, HubRefused)(f"hub answered {resp.status_code}: {resp.text[:300]}")
        return resp.text

    def events(self, device: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if device:
            params["device"] = device
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/events", params=params)["events"]
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/models")["models"]
        return result

    def model(self, name: str, version: str | None = None) -> dict[str, Any]:
        path = f"/api/v1/models/{quote(name, safe='')}"
        if version is not None:
            path += f"/versions/{quote(version, safe='')}"
        result: dict[str, Any] = self.request("GET", path)
        return result

    def model_diff(self, name: str, a: str, b: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/api/v1/models/{quote(name, safe='')}/diff",
                                              params={"a": a, "b": b})
        return result

    def trace(self, device: str, request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/api/v1/trace",
                                              params={"device": device, "request": request_id})
        return result

    def publish(self, body: dict[str, Any],
                on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """``on_progress(sent, total)``: called as the request body goes out (large models)."""
        if on_progress is None:
            result: dict[str, Any] = self.request("POST", "/api/v1/models", json=body)
            return result
        data = json.dumps(body).encode()
        sent: dict[str, Any] = self.request("POST", "/api/v1/models", content=UploadBody(data, on_progress),
                                            headers={"Content-Type": "application/json",
                                                     "Content-Length": str(len(data))})
        return sent

    def add_device(self, device: str, profile: str, credentials: str = "auto",
                   group: str | None = None) -> dict[str, Any]:
        body = {"device": device, "profile": profile, "credentials": credentials}
        if group:
            body["group"] = group
        result: dict[str, Any] = self.request("POST", "/api/v1/devices", json=body)
        return result

    def cancel_enrolment(self, device: str, enrolment: str) -> dict[str, Any]:
        """Undo the enrolment :meth:`add_device` just made (its answer's ``enrolment``): the
        bundle could not be written (hub.daemon.Hub.add_device)."""
        result: dict[str, Any] = self.request("POST", "/api/v1/devices",
                                              json={"device": device, "cancel": enrolment})
        return result

    def devices(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/devices")["devices"]
        return result

    def revoke_device(self, device: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", "/api/v1/devices/revoke", json={"device": device}
        )
        return result

    def deploy(self, model: str, version: str, devices: list[str],
               groups: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "version": version, "devices": devices}
        if groups:
            body["groups"] = groups
        result: dict[str, Any] = self.request("POST", "/api/v1/deploy", json=body)
        return result

    def audit(self, since: float | None = None) -> list[dict[str, Any]]:
        params = {"since": since} if since is not None else {}
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/audit", params=params)["entries"]
        return result

    def drift(self, model: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/api/v1/drift", params={"model": model} if model else {})
        return result

    def audit_verify(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/api/v1/audit/verify")
        return result

    def rollouts(self, key: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/rollouts",
                                                    params={"id": key} if key else {})["rollouts"]
        return result

    def rollout_start(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/api/v1/rollouts", json=body)
        return result

    def rollout_action(self, action: str, rollout: str | None = None, reason: str = "") -> dict[str, Any]:
        body = {"action": action, "rollout": rollout, "reason": reason}
        result: dict[str, Any] = self.request("POST", "/api/v1/rollouts/action", json=body)
        return result

    def rollback(self, model: str, to: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/api/v1/rollback", json={"model": model, "to": to})
        return result

    def tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/tokens")["tokens"]
        return result

    def add_token(self, name: str, role: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/api/v1/tokens", json={"name": name, "role": role})
        return result

    def revoke_token(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/api/v1/tokens/revoke", json={"name": name})
        return result
