"""Fleet metrics in the Prometheus text exposition format (``GET /metrics`` on the hub's HTTP port).

No authentication, like most exporters: the page holds counts, latencies and drift scores, no
secrets and no model bytes. Bind the hub's HTTP server to a private address (or put it behind a
proxy) if device names are sensitive. Families (all labelled with ``fleet``):

    edgefleet_hub_messages_total{result}                   ingest counters since hub start
    edgefleet_devices                                      registered devices
    edgefleet_device_online{device}                        1 online, 0 otherwise
    edgefleet_device_windows_total{device}                 telemetry windows stored
    edgefleet_device_last_window_seq{device}               highest window seq stored
    edgefleet_device_metric{device,name}                   the last window's flat ``metrics``
    edgefleet_model_requests_total{device,model,version}   summed over stored windows
    edgefleet_model_errors_total{device,model,version}
    edgefleet_drift_psi{model,version,scope,feature}       last drift scores (scope fleet|device:ID)
    edgefleet_drift_js{...}, edgefleet_drift_ks{...}
    edgefleet_drift_state{model,version,scope}             0 insufficient, 1 ok, 2 warn, 3 alarm
    edgefleet_rollout_state{rollout,model,from_version,to_version}
                                                           0 running, 1 paused, 2 promoted, 3 rolled_back,
                                                           4 aborted (the 50 newest rollouts)
    edgefleet_rollout_percent{rollout,model}               the current step's cohort percentage
    edgefleet_rollout_cohort_devices{rollout,model}        devices in the current cohort
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgefleet.hub.core.drift import STATES
from edgefleet.hub.core.rollout import STATES as ROLLOUT_STATES

if TYPE_CHECKING:
    from edgefleet.hub.core.drift import DriftReport
    from edgefleet.hub.db import Database

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        rows = [(lab, val) for lab, val in samples if val is not None and math.isfinite(float(val))]
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for lab, val in rows:
            self.lines.append(f"{name}{_labels(lab)} {float(val):.10g}")


def render(*, fleet: str, db: Database, counters: Mapping[str, int], drift: Sequence[DriftReport],
           rollouts: Sequence[Mapping[str, Any]], controller: Mapping[str, Any] | None = None) -> str:
    """The page: ingest ``counters`` (result -> count), what ``db`` holds about devices and
    telemetry, the latest ``drift`` reports (:meth:`~hub.services.drift_monitor.DriftMonitor.last_reports`)
    and the newest ``rollouts`` (:meth:`~hub.services.rollout_manager.RolloutManager.status`)."""
    w = _Writer()
    w.family("edgefleet_hub_messages_total", "counter", "Device messages seen by ingest, by result.",
             (({"fleet": fleet, "result": k}, v) for k, v in sorted(counters.items())))
    devices = db.device_summaries()
    w.family("edgefleet_devices", "gauge", "Registered devices.", [({"fleet": fleet}, len(devices))])
    w.family("edgefleet_device_online", "gauge", "1 if the device's retained status is online.",
             (({"fleet": fleet, "device": d["id"]}, 1.0 if d["status"] == "online" else 0.0) for d in devices))
    counts = db.telemetry_counts()
    w.family("edgefleet_device_windows_total", "counter", "Telemetry windows stored (duplicates dropped).",
             (({"fleet": fleet, "device": r["device"]}, r["n"]) for r in counts))
    w.family("edgefleet_device_last_window_seq", "gauge", "Highest telemetry window seq stored.",
             (({"fleet": fleet, "device": r["device"]}, r["last"]) for r in counts))
    samples: list[tuple[Mapping[str, str], float]] = []
    for device, metrics in db.last_window_metrics():
        for k, v in sorted(metrics.items()):
            if isinstance(v, int | float) and not isinstance(v, bool):
                samples.append(({"fleet": fleet, "device": device, "name": k}, float(v)))
    w.family("edgefleet_device_metric", "gauge", "The flat metrics of the device's last window.", samples)
    totals = db.model_totals()
    w.family("edgefleet_model_requests_total", "counter", "Inference requests in stored windows.",
             (({"fleet": fleet, "device": r["device"], "model": r["model"], "version": r["version"]}, r["req"])
              for r in totals))
    w.family("edgefleet_model_errors_total", "counter", "Failed inference requests in stored windows.",
             (({"fleet": fleet, "device": r["device"], "model": r["model"], "version": r["version"]}, r["err"])
              for r in totals))
    for stat in ("psi", "js", "ks"):
        w.family(f"edgefleet_drift_{stat}", "gauge", f"Last drift {stat.upper()} per feature against the reference.",
                 (({"fleet": fleet, "model": rep.model, "version": rep.version, "scope": rep.scope,
                    "feature": f.feature}, getattr(f, stat)) for rep in drift for f in rep.features))
    w.family("edgefleet_drift_state", "gauge", "Drift state: 0 insufficient, 1 ok, 2 warn, 3 alarm.",
             (({"fleet": fleet, "model": rep.model, "version": rep.version, "scope": rep.scope},
               STATES.index(rep.state)) for rep in drift))
    w.family("edgefleet_rollout_state", "gauge",
             "Rollout state: 0 running, 1 paused, 2 promoted, 3 rolled_back, 4 aborted.",
             (({"fleet": fleet, "rollout": r["id"], "model": r["model"], "from_version": r["from_version"],
                "to_version": r["to_version"]}, ROLLOUT_STATES.index(r["state"])) for r in rollouts))
    w.family("edgefleet_rollout_percent", "gauge", "The current step's cohort percentage.",
             (({"fleet": fleet, "rollout": r["id"], "model": r["model"]}, r["percent"]) for r in rollouts))
    w.family("edgefleet_rollout_cohort_devices", "gauge", "Devices in the current step's cohort.",
             (({"fleet": fleet, "rollout": r["id"], "model": r["model"]}, r["cohort_size"]) for r in rollouts))
    if controller is not None:
        replica = {"fleet": fleet, "replica": str(controller["replica"])}
        w.family("edgefleet_hub_controller", "gauge", "1 on the replica that is the elected controller, else 0.",
                 [(replica, 1.0 if controller["leading"] else 0.0)])
        w.family("edgefleet_hub_controller_epoch", "gauge", "The controller role's fencing epoch in the database.",
                 [({"fleet": fleet, "leader": str(controller["leader"] or "")}, controller["leader_epoch"] or 0)])
        w.family("edgefleet_hub_controller_heartbeat_age_seconds", "gauge",
                 "Seconds since the controller last stamped its heartbeat (database clock).",
                 [({"fleet": fleet}, controller["heartbeat_age_seconds"] or 0.0)])
    return "\n".join(w.lines) + "\n"
