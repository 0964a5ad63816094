"""3. Shadow canary cost: stable-path latency with shadow at 10 % and 100 % vs shadow off.

Measures the shipped shadow mode (``agent.core.canary.CanaryRun`` attached to the agent's real
``ModelServer``): the stable request is ``ModelServer.infer``; a sampled fraction of requests is
offered (``put_nowait``, skipped and counted when full) to a bounded queue, and the canary's
shadow thread replays them on the candidate's ONNX Runtime session and compares the answers
(labels, probability distance, latencies). What it shows is the cost that matters on a 2-core
device: the shadow thread competing with the request thread for the GIL and the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Result, Row, percentile, train_models, us
from edgefleet.agent.app.serving import LoadedModel, ModelServer, load
from edgefleet.agent.app.shadow import CanaryRun
from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.agent.core.canary import CanaryLimits, CanarySpec


def _loaded(tmp: str, name: str, version: str, blob: bytes, profile: DeviceProfile) -> LoadedModel:
    p = Path(tmp) / f"{version}.onnx"
    p.write_bytes(blob)
    entry = ModelEntry(version=version, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), url="http://unused/")
    return load(name, entry, p, profile)


def _attach(server: ModelServer, cand: LoadedModel, stable: ModelEntry, fraction: float, batched: bool) -> CanaryRun:
    spec = CanarySpec(rollout="bench", mode="shadow", fraction=fraction, stable=stable)
    # The guard judges as shipped (every 8th batch once 50 requests are in) but never drops: the
    # batched candidate's per-row latency share is not what this benchmark is about.
    limits = CanaryLimits(max_error_rate=1.0, max_latency_ratio=math.inf)
    run = CanaryRun(candidate=cand, spec=spec, limits=limits, on_drop=lambda r, v: None,
                    **({} if batched else {"max_batch": 1, "linger_s": 0.0}))
    server.attach_canary(cand.name, run)
    run.start()
    return run


def _detach(server: ModelServer, run: CanaryRun) -> dict[str, int]:
    assert run.shadow is not None
    deadline = time.monotonic() + 30
    while run.shadow.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the batch in flight
    server.detach_canary(run.name, run)
    run.stop()
    w = run.stats.window()
    return {"requests": w["requests"], "compared": w["compared"], "agreed": w["agreed"], "skipped": w["skipped"]}


def run(smoke: bool = False) -> Result:
    res = Result(
        "canary", "3. Shadow canary cost (stable-path latency)",
        "the same stable path (`ModelServer.infer`, telemetry on) with shadow off, in the same run.",
    )
    n = 200 if smoke else 20000
    rounds = 1 if smoke else 5
    profile = DeviceProfile(name="bench")
    models = train_models(small=smoke)
    stable_bytes, x_all = models["random_forest"]
    cand_bytes = models["gradient_boosting"][0]
    with tempfile.TemporaryDirectory() as tmp:
        server = ModelServer()
        stable = _loaded(tmp, "clf", "1", stable_bytes, profile)
        server.install(stable)
        cand = _loaded(tmp, "clf", "2", cand_bytes, profile)
        xs = [np.ascontiguousarray(x_all[i:i + 1]) for i in range(256)]
        settings = (("off", 0.0, False), ("10 %", 0.1, True), ("100 %", 1.0, True),
                    ("100 %, one replay per request", 1.0, False))
        lat: dict[str, list[float]] = {s[0]: [] for s in settings}
        round_p99: dict[str, list[float]] = {s[0]: [] for s in settings}
        stats: dict[str, dict[str, int]] = {}
        for _ in range(rounds):  # interleaved: load drift hits all alike
            for label, frac, batched in settings:
                run = _attach(server, cand, stable.entry, frac, batched) if frac else None
                out: list[float] = []
                for i in range(n):
                    x = xs[i & 255]
                    t0 = time.perf_counter()
                    server.infer("clf", {"input": x})
                    out.append(time.perf_counter() - t0)
                lat[label] += out
                round_p99[label].append(percentile(out, 99))
                if run is not None:
                    got = _detach(server, run)
                    prev = stats.setdefault(label, dict.fromkeys(got, 0))
                    for k, v in got.items():
                        prev[k] += v
        off50, off99 = percentile(lat["off"], 50), percentile(lat["off"], 99)
        off_lo, off_hi = min(round_p99["off"]), max(round_p99["off"])
        for label in ("10 %", "100 %", "100 %, one replay per request"):
            p50, p99 = percentile(lat[label], 50), percentile(lat[label], 99)
            compared, skipped, agreed = stats[label]["compared"], stats[label]["skipped"], stats[label]["agreed"]
            res.figures[label] = {"p50_s": p50, "p99_s": p99, "off_p50_s": off50, "off_p99_s": off99,
                                  "round_p99_s": round_p99[label], "off_round_p99_s": round_p99["off"],
                                  "compared": compared, "skipped": skipped}
            # "Within noise": no worse than the shadow-off p99 of the noisiest round of this run.
            res.add(Row(f"shadow {label}: stable p50 / p99", f"{us(p50)} / {us(p99)}",
                        f"{us(off50)} / {us(off99)} (rounds: {us(off_lo)}–{us(off_hi)})",
                        f"p99 {p99 / off99:.2f}×, p50 +{us(p50 - off50)}",
                        "p99 unchanged within noise", None if smoke else p99 <= off_hi))
            res.notes.append(f"shadow {label}: {compared} replayed and compared "
                             f"({100 * agreed / max(compared, 1):.1f} % label agreement), {skipped} skipped "
                             "because the queue was full.")
    res.notes.append("10 % and 100 % use the agent's defaults: the shadow thread waits 25 ms before each batch "
                     "and replays up to 256 queued requests (queue of 512) in one ONNX Runtime call and one comparison; "
                     "it takes the GIL twice per batch (before and after the candidate's run), so at most two "
                     "requests a batch wait behind it. The guard judges every 8th batch as shipped (never drops here). 'one replay per request' turns that off "
                     "(max_batch 1, no linger) to show what batching buys.")
    res.notes.append("'Within noise' is read as: the pooled p99 with shadow is no higher than the highest "
                     "per-round p99 with shadow off in the same run (the machine's own round-to-round spread). "
                     "Per-round stable p99 with shadow: " + "; ".join(
                         f"{k} {', '.join(us(v) for v in round_p99[k])}" for k in round_p99) + ".")
    res.notes.append(f"stable = random forest, candidate = gradient boosting, batch 1, {rounds} interleaved "
                     f"rounds × {n} requests per setting, one request thread; figures from the shipped "
                     "agent.canary (CanaryRun attached to ModelServer), deterministic sampling.")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    run(ap.parse_args().smoke)
