"""Agent configuration: ``agent.toml`` (written by ``edgefleet-hub device add``) and the device
profile it names (``device-profiles/*.toml``).

Both files are checked strictly: an unknown key is an error naming the key and the keys allowed,
so a typo never silently falls back to a default. Per-device overrides live in the agent config's
``[overrides]`` table, shaped like the profile (``[overrides.telemetry] window_seconds = 2``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgefleet.agent.contract.broker import parse_broker_urls
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import check_name

__all__ = ["AgentConfig", "DeviceProfile", "load_agent_config", "load_profile", "toml_string", "toml_value"]

GRAPH_LEVELS = ("disable", "basic", "extended", "all")

# TOML basic strings: the short escapes, then \uXXXX for every other control character.
_TOML_ESCAPES = {
    **{c: f"\\u{c:04X}" for c in (*range(0x20), 0x7F)},
    ord("\b"): "\\b", ord("\t"): "\\t", ord("\n"): "\\n", ord("\f"): "\\f", ord("\r"): "\\r",
    ord('"'): '\\"', ord("\\"): "\\\\",
}


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (quotes included) that reads back as exactly ``value``:
    how the hub writes every string of ``agent.toml`` and ``hub.toml``, operator-given URLs,
    names and paths included, so a quote, backslash or newline in one cannot end the string
    and add keys. Other characters stay as they are (the files are UTF-8)."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ConfigError(f"{value!r} holds a lone surrogate, which no TOML (or UTF-8) file can hold")
    return '"' + value.translate(_TOML_ESCAPES) + '"'


def toml_value(value: object) -> str:
    """A string, boolean or finite number as a TOML value (for ``[overrides]``)."""
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise ConfigError(f"cannot write {value!r} as a TOML value: expected a string, boolean or finite number")


@dataclass(frozen=True)
class DeviceProfile:
    """Everything the agent tunes per device class. Sizes in MiB, times in ms or s as named."""

    name: str
    description: str = ""
    # [onnxruntime]
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization_level: str = "all"
    # [limits]
    memory_budget_mb: int = 512
    max_blob_mb: int = 256
    latency_slo_ms: float = 100.0
    # [telemetry]
    window_seconds: float = 10.0
    spool_mb: float = 32.0  # may be fractional (0.05 = 50 KiB) for small devices and tests
    max_sampled_rows: int = 4096
    # a spooled window the hub has not acknowledged (wire.TelemetryAck) is published again after this
    resend_seconds: float = 30.0
    # [capture] sampled inputs/outputs uploaded to the hub for tracing (agent/capture.py); off at 0
    capture_sample_rate: float = 0.0
    capture_spool_kb: int = 4096
    capture_upload_seconds: float = 10.0
    capture_batch_records: int = 200

    @property
    def max_blob_bytes(self) -> int:
        return self.max_blob_mb * 1024 * 1024


_SECTIONS: dict[str, dict[str, str]] = {
    "profile": {"name": "name", "description": "description"},
    "onnxruntime": {
        "execution_providers": "execution_providers",
        "provider_options": "provider_options",
        "intra_op_threads": "intra_op_threads",
        "inter_op_threads": "inter_op_threads",
        "graph_optimization_level": "graph_optimization_level",
    },
    "limits": {
        "memory_budget_mb": "memory_budget_mb",
        "max_blob_mb": "max_blob_mb",
        "latency_slo_ms": "latency_slo_ms",
    },
    "telemetry": {
        "window_seconds": "window_seconds",
        "spool_mb": "spool_mb",
        "max_sampled_rows": "max_sampled_rows",
        "resend_seconds": "resend_seconds",
    },
    "capture": {
        "sample_rate": "capture_sample_rate",
        "spool_kb": "capture_spool_kb",
        "upload_seconds": "capture_upload_seconds",
        "batch_records": "capture_batch_records",
    },
}


def _check_keys(table: Mapping[str, Any], allowed: set[str] | Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}",
            reason="unknown_key",
        )


def _profile_values(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    _check_keys(doc, _SECTIONS, where)
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table, got {table!r}")
        _check_keys(table, _SECTIONS[section], f"{where} [{section}]")
        for key, value in table.items():
            values[_SECTIONS[section][key]] = value
    return values


def _build_profile(values: Mapping[str, Any], where: str) -> DeviceProfile:
    types = {f.name: f.type for f in fields(DeviceProfile)}
    clean: dict[str, Any] = {}
    for key, raw in values.items():
        kind = types[key]
        value = raw
        if key == "capture_sample_rate":  # a fraction, where 0 (off) is allowed
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"{where}: [capture] sample_rate must be a number from 0 to 1, got {value!r}")
            value = float(value)
        elif kind == "tuple[str, ...]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
                raise ConfigError(f"{where}: {key} must be a non-empty list of strings, got {value!r}")
            value = tuple(value)
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {key} must be a non-negative integer, got {value!r}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
            value = float(value)
        elif kind == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        elif kind.startswith("Mapping") and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table, got {value!r}")
        clean[key] = value
    if "name" not in clean:
        raise ConfigError(f"{where}: [profile] name is required")
    level = clean.get("graph_optimization_level", "all")
    if level not in GRAPH_LEVELS:
        raise ConfigError(
            f"{where}: graph_optimization_level must be one of {GRAPH_LEVELS}, got {level!r}"
        )
    return DeviceProfile(**clean)


def load_profile(path: Path, overrides: Mapping[str, Any] | None = None) -> DeviceProfile:
    """Read a device profile, apply per-device ``overrides`` (same shape), and check both."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"device profile {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"device profile {path} is not valid TOML: {exc}") from exc
    values = _profile_values(doc, str(path))
    if overrides:
        values.update(_profile_values(overrides, f"{path} overrides"))
    return _build_profile(values, str(path))


@dataclass(frozen=True)
class AgentConfig:
    fleet: str
    device: str
    broker_url: str  # one URL, or the nodes of a cluster comma-separated (the agent fails over)
    blob_url: str
    root_public_key: str
    state_dir: Path
    listen: str
    profile: DeviceProfile
    config_path: Path | None = None
    topic_prefix: str = "edgefleet/v1/"
    # Broker transport security: the CA pinned for the broker's certificate, the device's client
    # certificate and key, and/or a file holding its MQTT password (username = device id).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    password_file: Path | None = None
    # The token data-capture uploads carry (``Authorization: Bearer``), written at enrolment.
    capture_token_file: Path | None = None

    def capture_token(self) -> str | None:
        if self.capture_token_file is None:
            return None
        try:
            return self.capture_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read capture_token_file {self.capture_token_file}: {exc}") from exc

    def mqtt_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~agent.adapters.mqttlink.MqttLink`."""
        opts: dict[str, Any] = {
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "cert_file": str(self.cert_file) if self.cert_file else None,
            "key_file": str(self.key_file) if self.key_file else None,
        }
        if self.password_file is not None:
            opts["username"] = self.device
            try:
                opts["password"] = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read password_file {self.password_file}: {exc}") from exc
        return opts

    def fetch_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~agent.adapters.fetch.HttpFetcher`: ``ca_file`` (the hub's device
        CA) is pinned for https blob URLs on the hub's hosts (those of ``blob_url`` and
        ``broker_url``); blobs from any other store are verified with the system CAs."""
        if self.ca_file is None:
            return {}
        hosts = {urlsplit(self.blob_url).hostname} | {a.host for a in parse_broker_urls(self.broker_url)}
        return {"pinned_ca": self.ca_file, "pinned_hosts": sorted(h for h in hosts if h)}

    def with_profile(self, **changes: Any) -> AgentConfig:
        return replace(self, profile=replace(self.profile, **changes))


_AGENT_KEYS = {
    "fleet", "device", "broker_url", "blob_url", "root_public_key", "state_dir", "listen",
    "profile", "overrides", "topic_prefix", "ca_file", "cert_file", "key_file", "password_file",
    "capture_token_file",
}  # fmt: skip


def _security_files(doc: Mapping[str, Any], base: Path, path: Path) -> dict[str, Path | None]:
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "cert_file", "key_file", "password_file", "capture_token_file"):
        value = doc.get(key)
        if value is None:
            files[key] = None
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {key} must be a file path, got {value!r}")
        file = base / value
        if not file.is_file():
            raise ConfigError(f"{path}: {key} = {value!r} but {file} is not an existing file")
        files[key] = file
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError(f"{path}: cert_file and key_file go together; set both or neither")
    tls = str(doc["broker_url"]).startswith("mqtts://")
    https = str(doc["blob_url"]).startswith("https://")  # ca_file also pins the hub's blob server
    if (files["cert_file"] or (files["ca_file"] and not https)) and not tls:
        raise ConfigError(f"{path}: ca_file/cert_file need a TLS broker URL (mqtts://HOST:PORT)"
                          f"{'' if files['cert_file'] else ' or an https blob_url'}, "
                          f"got broker_url = {doc['broker_url']!r}")
    return files


def load_agent_config(path: Path) -> AgentConfig:
    """Read ``agent.toml``. Relative paths inside it are relative to the file's folder."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"agent config {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"agent config {path} is not valid TOML: {exc}") from exc
    _check_keys(doc, _AGENT_KEYS, str(path))
    doc = dict(doc)
    urls = doc.get("broker_url")
    if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
        doc["broker_url"] = ",".join(urls)  # the nodes of a cluster, as a TOML array
    for key in ("fleet", "device", "broker_url", "blob_url", "root_public_key", "profile"):
        if not isinstance(doc.get(key), str):
            raise ConfigError(f"{path}: {key!r} is required and must be a string"
                              f"{' (or, for broker_url, a list of them)' if key == 'broker_url' else ''}, "
                              f"got {doc.get(key)!r}")
    try:
        parse_broker_urls(doc["broker_url"])
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    base = path.parent
    overrides = doc.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: [overrides] must be a table")
    profile = load_profile(base / doc["profile"], overrides)
    try:
        fleet = check_name(doc["fleet"], "fleet")
        device = check_name(doc["device"], "device")
    except Exception as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return AgentConfig(
        fleet=fleet,
        device=device,
        broker_url=doc["broker_url"],
        blob_url=doc["blob_url"],
        root_public_key=doc["root_public_key"],
        state_dir=base / str(doc.get("state_dir", "/var/lib/edgefleet")),
        listen=str(doc.get("listen", "127.0.0.1:8500")),
        profile=profile,
        config_path=path,
        topic_prefix=str(doc.get("topic_prefix", "edgefleet/v1/")),
        **_security_files(doc, base, path),
    )
