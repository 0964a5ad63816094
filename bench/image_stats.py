"""11. What image statistics cost, beside the model: a small CNN (tests/_modelenv.cnn_model, the one
tests/system/test_model_families_e2e.py serves:
Conv 3→4 3x3, Relu, GlobalAveragePool, MatMul, Softmax, ArgMax) in ONNX Runtime, one request of
4 images per call, at 8x8 and at 64x64 pixels.

* **request path**: ``session.run`` alone (the baseline) against ``session.run`` plus what the agent
  adds per request for telemetry (``Recorder.record``: the latency and a reference to the input
  array, no copy, no statistics), interleaved so load drift hits both alike;
* **off the request path**: folding one closed window (``fold``: at most 64 images binned per
  channel and per image) against the model's own time for that window's requests.

Run: ``python -m bench.image_stats [--smoke]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from bench.common import Result, Row, interleaved_min_median, median_seconds, us
from edgefleet.agent.app.recorder import Recorder
from edgefleet.agent.core.telemetry import fold
from edgefleet.hub.core.reference import compute_reference
from tests._modelenv import cnn_model


def _cnn(size: int) -> bytes:
    return cnn_model(size).SerializeToString()  # type: ignore[no-any-return]


def run(smoke: bool = False) -> Result:
    res = Result("image_stats", "11. Image statistics: request-path and window cost beside a small CNN",
                 "ONNX Runtime's `session.run` on the same 4-image request (one thread), measured in the same run.")
    calls, rounds = (50, 3) if smoke else (500, 15)
    for size in (8, 64):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(_cnn(size), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        x = rng.beta(2.0, 3.0, size=(4, 3, size, size)).astype(np.float32)
        train = rng.beta(2.0, 3.0, size=(200, 3, size, size)).astype(np.float32)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": train}), strict=True))
        ref = compute_reference(train.astype(np.float64), input_name="image", outputs=outs)
        rec = Recorder("1", output_names=tuple(o.name for o in sess.get_outputs()))

        def bare() -> None:
            sess.run(None, {"image": x})

        def recorded() -> None:
            t0 = time.perf_counter()
            out = sess.run(None, {"image": x})
            rec.record(time.perf_counter() - t0, x, out[0], outputs=out)  # as serving records: every output

        t = interleaved_min_median({"bare": bare, "recorded": recorded}, calls=calls, rounds=rounds)
        rec.swap()
        added = t["recorded"] - t["bare"]
        res.add(Row(f"{size}×{size}×3, 4 images: request path", f"{us(t['recorded'])} (+{us(added)})",
                    f"{us(t['bare'])} session.run", f"{t['recorded'] / t['bare']:.3f}×", "added < model time",
                    added < t["bare"]))
        per_window = 100  # requests in a window: 400 images, of which 64 are folded
        for _ in range(per_window):
            rec.record(1e-4, x, np.zeros(4, np.int64), outputs=[np.zeros(4, np.int64), np.full((4, 3), 1 / 3, np.float32)])
        snap = rec.swap()
        f = median_seconds(lambda: fold(snap, ref), 3 if smoke else 15)
        model_window = t["bare"] * per_window
        res.add(Row(f"{size}×{size}×3: fold a window of {per_window} requests (off the request path)",
                    f"{f * 1000:.2f} ms", f"{model_window * 1000:.2f} ms of model time for those requests",
                    f"{f / model_window:.2f}×", "", None))
    res.notes.append("The request path keeps a reference to the input array (bounded per window by rows and "
                     "bytes: Recorder max_rows, max_bytes); every statistic is computed when the window "
                     "closes, on at most 64 images (agent.core.telemetry.TENSOR_SAMPLES).")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    print(run(ap.parse_args().smoke).markdown())
