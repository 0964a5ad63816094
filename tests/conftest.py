"""Shared fixtures: a real Mosquitto per test on a free port, processes that are always reaped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http_ok(url: str) -> bool:
    """GET ``url`` answers 200 (for waiting until a hub or agent serves)."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def hub_up(port: int) -> bool:
    return http_ok(f"http://127.0.0.1:{port}/healthz")


def wait_port(port: int, timeout: float = 10.0) -> None:
    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(up, timeout, f"port {port}")


def mosquitto_bin() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None
    )


class Broker:
    """A real Mosquitto on 127.0.0.1:port; ``stop``/``start`` simulate an outage."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n"
        )
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = mosquitto_bin()
        assert binary, "mosquitto is not installed (apt-get install -y mosquitto)"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def fleet() -> str:
    """A fleet name unique to the test: its own topic root edgefleet/v1/{fleet}/."""
    return f"t{uuid.uuid4().hex[:12]}"


class Procs:
    """Start background processes with logs to files; all are killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.{len(self.procs)}.log"
        p = subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=REPO,
        )
        self.procs.append((p, log))
        return p

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for _, log in self.procs)

    def stop_all(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(ps.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def run_cli(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hub.cli ...`` (or agent.cli) to completion, as a user would."""
    res = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def retained(broker: Broker, topic: str, timeout: float = 5.0) -> bytes:
    """The retained message on ``topic`` (waits up to ``timeout`` for it)."""
    got: list[bytes] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, 1)
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        wait_for(lambda: got, timeout, f"retained message on {topic}")
    finally:
        c.disconnect()
        c.loop_stop()
    return got[-1]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """One throwaway PostgreSQL cluster for the session (tests/_postgres.py); each test that
    wants a database takes a fresh one from it (``pg_url``)."""
    from tests._postgres import PgCluster

    cluster = PgCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: object) -> str:
    """The URL of a fresh, empty PostgreSQL database."""
    return pg_cluster.new_database()  # type: ignore[attr-defined, no-any-return]


def use_db(home: object, target: str | Path) -> None:
    """Point a fresh hub home at *target* (``db_target``): hub.toml ``db`` for PostgreSQL; the
    home's own hub.db for SQLite."""
    if isinstance(target, str):
        home.update_config(db=target)  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a hub database lives, once per engine: the same test runs on SQLite and on
    PostgreSQL (a fresh database of the session's cluster)."""
    if request.param == "sqlite":
        return tmp_path / "hub.db"
    return request.getfixturevalue("pg_url")  # type: ignore[no-any-return]


S3_KEY, S3_SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def botocore_s3(endpoint: str, key: str = S3_KEY, secret: str = S3_SECRET, region: str = "us-east-1") -> object:
    """botocore's S3 client (path style, SigV4): what the tests compare the hub's signing with."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", region_name=region, endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[str]:
    """A real S3 API (moto_server) on a free port, with the bucket 'fleet'; its endpoint URL."""
    # the interpreter's own module, not a moto_server script that may be off PATH (pip's scripts folder)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=(tmp_path / "moto.log").open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20)
        endpoint = f"http://127.0.0.1:{port}"
        botocore_s3(endpoint).create_bucket(Bucket="fleet")  # type: ignore[attr-defined]
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def infer_load(ports: Callable[[], Iterable[int]], x: np.ndarray, stop: threading.Event, *, rows: int, seed: int,
               every: float = 0.05, model: str = "clf") -> threading.Thread:
    """A started thread that posts ``rows`` random rows of ``x`` to every agent in ``ports()`` (their
    OIP endpoints) every ``every`` seconds until ``stop`` is set; refused requests (an agent being
    killed or restarted) are ignored."""
    def run() -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                for port in ports():
                    batch = x[rng.integers(0, len(x), rows)]
                    body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                                        "data": batch.reshape(-1).tolist()}]}
                    with contextlib.suppress(httpx.HTTPError):
                        c.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=body)
                stop.wait(every)
    t = threading.Thread(target=run, daemon=True, name="infer-load")
    t.start()
    return t
