"""12. What category statistics cost, beside the model: a scikit-learn Pipeline with a string column
(OneHotEncoder on ``city``, a scaler on ``x`` and ``y``, LogisticRegression), converted by skl2onnx
with one input per column as ``publish`` converts it, in ONNX Runtime on one thread.

* **request path**: ``session.run`` alone (the baseline) against ``session.run`` plus what the agent
  adds per request for telemetry (``Recorder.record`` with the other inputs and every output:
  references to the arrays, no copy, no counting), interleaved so load drift hits both alike, at
  1 and 32 rows a request;
* **off the request path**: folding one closed window of 100 requests (``fold``: the city counted
  on its categories, unseen ones named; the numeric columns and the probabilities binned) against
  the model's own time for that window's requests;
* **at the hub**: scoring the merged window of a category feature (PSI, JS, the two-sample
  chi-square and what moved), beside scoring a numeric feature of as many bins.

Run: ``python -m bench.category_stats [--smoke]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from bench.common import Result, Row, interleaved_min_median, median_seconds, us
from edgefleet.agent.app.recorder import Recorder
from edgefleet.agent.core.telemetry import fold
from edgefleet.hub.core.drift import Policy, score_categories, score_histogram
from edgefleet.hub.core.reference import compute_inputs_reference

CITIES = np.array([f"city-{i:02d}" for i in range(40)])


def _rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    p = 1.0 / np.arange(1, len(CITIES) + 1)
    city = rng.choice(CITIES, size=n, p=p / p.sum()).astype(object)
    city[rng.random(n) < 0.02] = "somewhere-new"
    return {"city": city.reshape(-1, 1), "x": rng.normal(size=(n, 1)).astype(np.float32),
            "y": rng.normal(size=(n, 1)).astype(np.float32)}


def _pipeline(rng: np.random.Generator) -> bytes:
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from edgefleet.hub.adapters.modelfile import sklearn_to_onnx

    cols = _rows(rng, 2000)
    df = pd.DataFrame({k: v.reshape(-1) for k, v in cols.items()})
    pipe = Pipeline([("cols", ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
                                                 ("num", StandardScaler(), ["x", "y"])])),
                     ("clf", LogisticRegression())]).fit(df, (df["x"] > 0).astype(int))
    return sklearn_to_onnx(pipe, 3, {"city": True, "x": False, "y": False})


def run(smoke: bool = False) -> Result:
    res = Result("category_stats", "12. Category statistics: request-path, window and hub cost beside a pipeline",
                 "ONNX Runtime's `session.run` on the same request (one thread), measured in the same run.")
    calls, rounds = (50, 3) if smoke else (1000, 15)
    rng = np.random.default_rng(1)
    model = _pipeline(rng)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    names = tuple(o.name for o in sess.get_outputs())
    train = _rows(rng, 2000)
    outs = dict(zip(names, sess.run(None, train), strict=True))
    ref = compute_inputs_reference(train, outputs=outs)
    for batch in (1, 32):
        feeds = _rows(rng, batch)
        rec = Recorder("1", output_names=names)

        def bare() -> None:
            sess.run(None, feeds)

        def recorded() -> None:
            t0 = time.perf_counter()
            out = sess.run(None, feeds)
            rec.record(time.perf_counter() - t0, feeds["city"], out[0], others={"x": feeds["x"], "y": feeds["y"]},
                       outputs=out)

        t = interleaved_min_median({"bare": bare, "recorded": recorded}, calls=calls, rounds=rounds)
        rec.swap()
        added = t["recorded"] - t["bare"]
        res.add(Row(f"{batch} row(s) a request: request path", f"{us(t['recorded'])} (+{us(added)})",
                    f"{us(t['bare'])} session.run", f"{t['recorded'] / t['bare']:.3f}×", "added < model time",
                    added < t["bare"]))
        per_window = 100
        for _ in range(per_window):
            f = _rows(rng, batch)
            out = sess.run(None, f)
            rec.record(1e-4, f["city"], out[0], others={"x": f["x"], "y": f["y"]}, outputs=out)
        snap = rec.swap()
        fl = median_seconds(lambda: fold(snap, ref), 3 if smoke else 15)
        model_window = t["bare"] * per_window
        res.add(Row(f"{batch} row(s): fold a window of {per_window} requests (off the request path)",
                    f"{fl * 1000:.2f} ms", f"{model_window * 1000:.2f} ms of model time for those requests",
                    f"{fl / model_window:.2f}×", "", None))
    hists = {h["name"]: h for h in fold(snap, ref).inputs}
    city, x = ref.categories[0], ref.features[0]
    score = interleaved_min_median(
        {"category": lambda: score_categories(city, hists["city"], Policy()),
         "numeric": lambda: score_histogram(x.name, x.freqs, hists["x"], Policy())},
        calls=calls, rounds=rounds)
    res.add(Row(f"hub: score one category feature ({len(city.freqs)} bins + unseen, missing)",
                us(score["category"]), f"{us(score['numeric'])} a numeric feature ({len(x.freqs)} bins)",
                f"{score['category'] / score['numeric']:.2f}×", "", None))
    res.notes.append("The request path keeps references to the arrays (bounded per window by rows and bytes); "
                     "categories are counted when the window closes: a Counter over the window's values, then "
                     "one lookup per distinct value.")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    print(run(ap.parse_args().smoke).markdown())
