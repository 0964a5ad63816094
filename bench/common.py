"""Shared benchmark plumbing: results, timing statistics, models, a real Mosquitto."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of a result table: what was measured, edgefleet beside its baseline."""

    case: str
    edgefleet: str
    baseline: str
    ratio: str = ""
    target: str = ""
    met: bool | None = None


@dataclass
class Result:
    name: str
    title: str
    baseline: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.case}: edgefleet {row.edgefleet} | baseline {row.baseline}"
              f"{' | ' + row.ratio if row.ratio else ''}{' | target ' + row.target if row.target else ''}"
              f"{'' if row.met is None else (' OK' if row.met else ' MISSED')}", flush=True)

    def markdown(self) -> str:
        out = [f"## {self.title}", "", f"Baseline: {self.baseline}", "",
               "| case | edgefleet | baseline | ratio / added | target | met |",
               "|---|---|---|---|---|---|"]
        for r in self.rows:
            met = "" if r.met is None else ("yes" if r.met else "**no**")
            out.append(f"| {r.case} | {r.edgefleet} | {r.baseline} | {r.ratio} | {r.target} | {met} |")
        if self.notes:
            out.append("")
            out.extend(f"- {n}" for n in self.notes)
        out.append("")
        return "\n".join(out)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    """The median wall time of ``rounds`` calls of ``fn`` (one call per round: work that is done
    once per telemetry window, such as folding it)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def interleaved_min_median(fns: dict[str, Callable[[], object]], *, calls: int, rounds: int) -> dict[str, float]:
    """Per-call time of each fn: median over ``rounds`` of (batch of ``calls`` calls).

    The functions are run in alternation, round by round, so that drift in machine load (2 cores
    shared with other work) hits all of them alike.
    """
    per: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm up
        for _ in range(min(calls, 200)):
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per[k].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in per.items()}


def train_models(n_features: int = 10, n_samples: int = 2000, *, small: bool = False) -> dict[str, tuple[bytes, np.ndarray]]:
    """LogisticRegression, GradientBoosting and RandomForest converted with skl2onnx."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    from edgefleet.hub.adapters.modelfile import sklearn_to_onnx

    X, y = make_classification(n_samples=n_samples, n_features=n_features, n_informative=6, random_state=3)
    X = X.astype(np.float32)
    trees = 10 if small else 100
    models = {
        "logistic_regression": LogisticRegression(max_iter=500),
        "gradient_boosting": GradientBoostingClassifier(n_estimators=trees, max_depth=3, random_state=0),
        "random_forest": RandomForestClassifier(n_estimators=trees, max_depth=8, random_state=0),
    }
    return {name: (sklearn_to_onnx(m.fit(X, y), n_features), X) for name, m in models.items()}


def relabelled(data: bytes, note: str) -> bytes:
    """Other bytes for the same model: the ONNX doc string says ``note``, the graph is unchanged."""
    import onnx

    m = onnx.load_from_string(data)
    m.doc_string = note
    return m.SerializeToString()


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, want), hard) if hard != resource.RLIM_INFINITY else max(soft, want)
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Mosquitto:
    """A real Mosquitto on a free loopback port, configured for many clients and deep queues."""

    def __init__(self, workdir: Path, *, max_queued: int = 1_000_000) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_connections -1\nmax_queued_messages {max_queued}\nmax_inflight_messages 1000\n"
            "log_type error\n"
        )
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        raise_nofile()  # inherited by the broker: one descriptor per client
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(up, 10, f"mosquitto on port {self.port}", 0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def machine() -> dict[str, str]:
    import platform

    import onnxruntime
    import paho.mqtt
    import psutil

    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        mv = subprocess.run([mosq, "-h"], capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        mv = "unknown"
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores)",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "paho-mqtt": paho.mqtt.__version__,
        "mosquitto": mv,
        "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
