"""6. Footprint: agent RSS while serving, and start-to-first-served-request.

The agent runs as a real process (``python -m edgefleet.agent.app.cli run``) with a model already installed in
its store and a real Mosquitto to connect to. Baselines, also fresh processes in the same run:

* **bare**: a process that imports onnxruntime, numpy, paho-mqtt and httpx and then idles;
* **bare + session**: the same, plus one ``InferenceSession`` on the same model, run once
  (the least any process serving this model must hold).

The agent package is byte-compiled first (``compileall``), as ``pip install`` does on a device:
the baselines' libraries come byte-compiled from site-packages, and an agent compiling its own
modules from source at every start (as it would here, where ``PYTHONDONTWRITEBYTECODE`` is set)
keeps about 1 MiB more resident and starts slower.

RSS is read with psutil after 200 served requests (agent) / after start (baselines). Start time
is from ``Popen`` to the first HTTP 200 from ``/v2/models/clf/infer`` (agent) / to the process
printing that it ran the session once (bare + session).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import REPO, Mosquitto, Result, Row, free_port, train_models
from edgefleet.agent.contract.envelope import public_key_to_b64
from edgefleet.agent.contract.wire import ModelEntry

BARE = ("import sys, time, onnxruntime, numpy, paho.mqtt.client, httpx\n"
        "if len(sys.argv) > 1:\n"
        "    s = onnxruntime.InferenceSession(open(sys.argv[1], 'rb').read(), providers=['CPUExecutionProvider'])\n"
        "    s.run(None, {s.get_inputs()[0].name: numpy.zeros((1, 10), numpy.float32)})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")


def _agent_dir(tmp: Path, data: bytes, broker_url: str, port: int) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    state = tmp / "state"
    (state / "blobs").mkdir(parents=True)
    (state / "blobs" / sha).write_bytes(data)
    entry = ModelEntry(version="1", sha256=sha, size=len(data), url=f"http://127.0.0.1:1/blobs/{sha}")
    (state / "state.json").write_text(json.dumps({
        "kind": "edgefleet.agent-state/v1", "last_seq": 1, "models": {"clf": {"entry": entry.to_dict(), "fallback": None}}}))
    (tmp / "profile.toml").write_text((REPO / "device-profiles" / "generic-x86_64.toml").read_text())
    root = public_key_to_b64(Ed25519PrivateKey.generate().public_key())
    cfg = tmp / "agent.toml"
    cfg.write_text(f'fleet = "bench"\ndevice = "dev1"\nbroker_url = "{broker_url}"\n'
                   f'blob_url = "http://127.0.0.1:1"\nroot_public_key = "{root}"\nstate_dir = "state"\n'
                   f'listen = "127.0.0.1:{port}"\nprofile = "profile.toml"\n')
    return cfg


def _agent_once(cfg: Path, port: int, body: dict, requests: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.agent.app.cli", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v2/models/clf/infer"
        with httpx.Client(timeout=5) as c:
            while True:
                try:
                    if c.post(url, json=body).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {proc.returncode}")
                if time.perf_counter() - t0 > 60:
                    raise TimeoutError("agent did not serve within 60 s")
                time.sleep(0.005)
            t_first = time.perf_counter() - t0
            for _ in range(requests):
                c.post(url, json=body).raise_for_status()
        time.sleep(0.3)
        rss = psutil.Process(proc.pid).memory_info().rss
        return t_first, rss
    finally:
        proc.terminate()
        proc.wait(10)


def _bare_once(model: Path | None) -> tuple[float, int]:
    t0 = time.perf_counter()
    argv = [sys.executable, "-c", BARE] + ([str(model)] if model else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        t = time.perf_counter() - t0
        time.sleep(0.3)
        return t, psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.kill()
        proc.wait(10)


def run(smoke: bool = False) -> Result:
    res = Result(
        "footprint", "6. Footprint (agent process)",
        "a bare process importing onnxruntime, numpy, paho-mqtt and httpx; the same plus one "
        "InferenceSession on the same model, run once.",
    )
    reps = 1 if smoke else 5
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "agent")], check=True,
                   stdout=subprocess.DEVNULL)
    data, x = train_models(small=True)["logistic_regression"]
    body = {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": x[0].tolist()}]}
    with tempfile.TemporaryDirectory() as tmp_s, Mosquitto(Path(tmp_s) / "broker") as broker:
        tmp = Path(tmp_s)
        port = free_port()
        cfg = _agent_dir(tmp / "agent", data, broker.url, port)
        model = tmp / "m.onnx"
        model.write_bytes(data)
        agent, bare, bare_s = [], [], []
        for _ in range(reps):  # interleaved
            agent.append(_agent_once(cfg, port, body, 20 if smoke else 200))
            bare.append(_bare_once(None))
            bare_s.append(_bare_once(model))
    med = lambda xs, i: statistics.median(v[i] for v in xs)  # noqa: E731
    a_t, a_rss = med(agent, 0), med(agent, 1)
    b_t, b_rss = med(bare, 0), med(bare, 1)
    s_t, s_rss = med(bare_s, 0), med(bare_s, 1)
    mb = 2**20
    res.figures = {"agent_rss": a_rss, "bare_rss": b_rss, "bare_session_rss": s_rss,
                   "agent_first_s": a_t, "bare_start_s": b_t, "bare_session_start_s": s_t}
    res.add(Row("RSS while serving", f"{a_rss / mb:.1f} MiB",
                f"bare {b_rss / mb:.1f} MiB; bare + session {s_rss / mb:.1f} MiB",
                f"+{(a_rss - b_rss) / mb:.1f} MiB over bare (+{(a_rss - s_rss) / mb:.1f} over bare + session)",
                "≤ 10 MB above bare", None if smoke else (a_rss - b_rss) <= 10e6))
    res.add(Row("start to first served request (model installed)", f"{a_t:.2f} s",
                f"bare imports {b_t:.2f} s; bare + session run once {s_t:.2f} s",
                f"+{a_t - s_t:.2f} s over bare + session", "≤ 1.5 s", None if smoke else a_t <= 1.5))
    res.notes.append(f"median of {reps} interleaved fresh starts of each; agent over HTTP (httpx client "
                     "polling every 5 ms), connected to a real Mosquitto; generic-x86_64 profile; agent package "
                     "byte-compiled first, as an installed wheel is.")
    res.notes.append("The bare + session baseline uses ONNX Runtime's default session options; the agent's "
                     "are the profile's (generic-x86_64: 2 intra-op threads, 1 inter-op, all graph "
                     "optimisations). No session option measurably changes a session's memory: of its "
                     "~10 MiB, ~8.5 MiB are onnxruntime's own code pages, touched when the first session "
                     "registers the CPU kernels (clean, file-backed: the kernel can drop them under memory "
                     "pressure), and ~1.4 MiB heap; arena, memory pattern, thread count and spinning "
                     "settings each moved it by ≤ 0.3 MiB.")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    run(ap.parse_args().smoke)
