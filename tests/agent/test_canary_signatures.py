"""Preflight sets and canary comparisons for every model signature, on real ONNX Runtime sessions:
an image classifier (N x 3 x 8 x 8 float input, Conv -> Relu -> GlobalAveragePool -> Flatten ->
MatMul -> Softmax and ArgMax), a two-input model (float ``a`` and int64 ``b``, Concat -> MatMul),
a scikit-learn pipeline on a DataFrame with a string column (one ``tensor(string)`` input and one
float input, string class labels) converted by skl2onnx, a float64 regressor with an ``[N]``
output and a feature map (an N-D ``[N, C, H, W]`` output). Each set is built and checked by the
hub (:mod:`edgefleet.hub.adapters.preflight`) and run by the agent (:mod:`agent.core.canary`);
the shadow replay batches and compares real sessions through :mod:`agent.app.shadow`."""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.app.serving import ModelServer, load
from edgefleet.agent.app.shadow import CanaryRun
from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.agent.core.canary import (
    REGRESSION_AGREEMENT,
    CanaryLimits,
    CanarySpec,
    PreflightParams,
    PreflightRejected,
    compare_outputs,
    load_preflight,
    run_preflight,
)
from edgefleet.hub.adapters.preflight import build_preflight, check_preflight
from edgefleet.hub.errors import BadRequest

pd = pytest.importorskip("pandas")  # the string-column pipeline is trained on a DataFrame

PROFILE = DeviceProfile(name="t", latency_slo_ms=1000.0, memory_budget_mb=256)
SHA = "ab" * 32
ROWS = 48


# --- models -------------------------------------------------------------------------------------


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], weights: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _weights(seed: int, shapes: dict[str, tuple[int, ...]], noise: float) -> dict[str, np.ndarray]:
    """Seeded weights; ``noise`` > 0 adds a seeded perturbation of that scale (a retrained version)."""
    rng, jitter = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
    out = {}
    for k, shape in shapes.items():
        w = rng.normal(size=shape)
        if noise:
            w = w + noise * jitter.normal(size=shape)
        out[k] = w.astype(np.float32)
    return out


@functools.cache
def cnn(noise: float = 0.0) -> bytes:
    """image [N, 3, 8, 8] -> label int64 [N], probabilities float [N, 3]. The pooled features are
    centred on their mean over seeded images (``b2``), so that every class is predicted."""
    w = _weights(1, {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 3)}, noise)
    trunk = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])
    base = _weights(1, {"w1": (4, 3, 3, 3), "b1": (4,)}, 0.0)
    features = _model(trunk, [image], [helper.make_tensor_value_info("f", TensorProto.FLOAT, [None, 4])], base)
    (f,) = session(features).run(None, {"image": images(256, seed=99)})
    w["mean"] = f.mean(axis=0).astype(np.float32)
    head = [
        helper.make_node("Sub", ["f", "mean"], ["fc"]),
        helper.make_node("MatMul", ["fc", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    return _model(trunk + head, [image],
                  [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                   helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])], w)


@functools.cache
def feature_map(noise: float = 0.0) -> bytes:
    """image [N, 3, 8, 8] -> features float [N, 4, 8, 8] (an N-D regression output)."""
    w = _weights(2, {"w1": (4, 3, 3, 3), "b1": (4,)}, noise)
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["features"])]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 4, 8, 8])], w)


@functools.cache
def two_inputs(noise: float = 0.0) -> bytes:
    """a float [N, 3], b int64 [N, 2] -> y float [N, 2] = concat(a, float(b)) @ w."""
    w = _weights(3, {"w": (5, 2)}, noise)
    nodes = [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Concat", ["a", "bf"], ["ab"], axis=1),
             helper.make_node("MatMul", ["ab", "w"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3]),
                          helper.make_tensor_value_info("b", TensorProto.INT64, [None, 2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], w)


@functools.cache
def regressor(noise: float = 0.0) -> bytes:
    """x double [N, 4] -> y double [N] (a 2-D table the legacy ``input`` form cannot carry)."""
    w = {k: v.astype(np.float64) for k, v in _weights(4, {"w": (4, 1), "b": (1,)}, noise).items()}
    w["axes"] = np.array([1], dtype=np.int64)  # type: ignore[assignment]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y1"]),
             helper.make_node("Squeeze", ["y1", "axes"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [None, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None])], w)


CITIES = np.array(["paris", "lyon", "nice", "brest", "saint-etienne"])


def city_frame(n: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"city": rng.choice(CITIES, n), "x": rng.normal(size=n).astype(np.float32)})


@functools.cache
def city_pipeline(shuffled: bool = False) -> tuple[bytes, Any]:
    """ColumnTransformer(OneHotEncoder on the string column ``city``, ``x`` passed through) +
    LogisticRegression on a DataFrame, string classes; converted with one input per column.
    ``shuffled`` trains on permuted labels: a candidate that runs fine and answers otherwise."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    df = city_frame(400, 0)
    score = df["x"].to_numpy() + 1.5 * (df["city"] == "paris").to_numpy() - (df["city"] == "brest").to_numpy()
    y = np.where(score > 0.5, "yes", np.where(score < -0.5, "no", "maybe"))
    if shuffled:
        y = np.random.default_rng(1).permutation(y)
    clf = LogisticRegression(max_iter=500)
    pipe = Pipeline([("pre", ColumnTransformer([("oh", OneHotEncoder(handle_unknown="ignore"), ["city"])],
                                               remainder="passthrough")), ("clf", clf)]).fit(df, y)
    onx = to_onnx(pipe, initial_types=[("city", StringTensorType([None, 1])), ("x", FloatTensorType([None, 1]))],
                  options={id(clf): {"zipmap": False}}, target_opset=17)
    return onx.SerializeToString(), pipe


def rename_input(model: bytes, old: str, new: str) -> bytes:
    """The same graph with input ``old`` called ``new``: a set for ``old`` no longer fits it."""
    m = onnx.load_model_from_string(model)
    for vi in m.graph.input:
        if vi.name == old:
            vi.name = new
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    return m.SerializeToString()


def session(blob: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def answer(blob: bytes, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    s = session(blob)
    feed = {k: v.astype(object) if v.dtype.kind == "U" else v for k, v in feeds.items()}
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed), strict=True))


def images(n: int, seed: int = 0) -> np.ndarray:
    """Seeded images whose channels differ in brightness from image to image."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3, 8, 8)) + 2 * rng.normal(size=(n, 3, 1, 1))).astype(np.float32)


def city_inputs(n: int, seed: int = 7) -> dict[str, np.ndarray]:
    df = city_frame(n, seed)
    return {"city": df["city"].to_numpy(dtype=str).reshape(-1, 1), "x": df["x"].to_numpy().reshape(-1, 1)}


# --- the families --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    model: Callable[[], bytes]
    other: Callable[[], bytes]  # changed weights / another training: outputs differ
    data: Callable[[], dict[str, np.ndarray]]
    fails_with: str  # the preflight reason ``other`` fails with
    renamed: tuple[str, str]  # an input to rename for the "wrong input names" case
    estimator: Callable[[], Any] | None = None


FAMILIES = [
    Family("image", cnn, lambda: cnn(0.3), lambda: {"image": images(ROWS)}, "preflight_labels",
           ("image", "pixels")),
    Family("feature_map", feature_map, lambda: feature_map(0.05), lambda: {"image": images(ROWS)},
           "preflight_outputs", ("image", "pixels")),
    Family("two_inputs", two_inputs, lambda: two_inputs(0.05),
           lambda: {"a": np.random.default_rng(5).normal(size=(ROWS, 3)).astype(np.float32),
                    "b": np.random.default_rng(6).integers(-3, 4, size=(ROWS, 2))},
           "preflight_outputs", ("b", "c")),
    Family("strings", lambda: city_pipeline()[0], lambda: city_pipeline(shuffled=True)[0],
           lambda: city_inputs(ROWS), "preflight_labels", ("city", "town"), lambda: city_pipeline()[1]),
    Family("regressor", regressor, lambda: regressor(0.05),
           lambda: {"x": np.random.default_rng(8).normal(size=(ROWS, 4))}, "preflight_outputs", ("x", "features")),
]
IDS = [f.name for f in FAMILIES]


def blob_for(f: Family) -> bytes:
    return build_preflight(f.model(), f.data(), f.estimator() if f.estimator else None, rows=ROWS)


def agent_preflight(model: bytes, blob: bytes) -> Any:
    return run_preflight(session(model), load_preflight(blob), PreflightParams(), PROFILE, clock=time.perf_counter)


# --- preflight: hub builds and checks, agent runs ---------------------------------------------------


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_the_hub_builds_a_set_per_input_that_the_hub_and_the_agent_pass(f: Family) -> None:
    blob = blob_for(f)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    inputs = {k: v for k, v in arrays.items() if k.startswith("input")}
    assert sorted(inputs) == sorted(f"input:{k}" for k in f.data())  # none of these is a float table
    for k, v in f.data().items():
        assert np.array_equal(inputs[f"input:{k}"], v.astype(inputs[f"input:{k}"].dtype))
        assert len(v) == ROWS
    summary = check_preflight(f.model(), blob)
    assert summary["rows"] == ROWS and summary["inputs"] == sorted(f.data())
    res = agent_preflight(f.model(), blob)
    assert res.ok, res
    assert res.details["rows"] == ROWS


def test_inputs_are_stored_in_the_models_dtypes_strings_as_unicode() -> None:
    with np.load(io.BytesIO(blob_for(FAMILIES[2])), allow_pickle=False) as npz:
        assert (npz["input:a"].dtype, npz["input:b"].dtype) == (np.float32, np.int64)
    with np.load(io.BytesIO(blob_for(FAMILIES[3])), allow_pickle=False) as npz:
        assert npz["input:city"].dtype.kind == "U" and npz["input:city"].shape == (ROWS, 1)
        assert npz["input:x"].dtype == np.float32
        # the string class labels are carried (from the estimator) and checked by agreement
        assert npz["output:label"].dtype.kind == "U"
        assert set(npz["output:label"].tolist()) <= {"yes", "no", "maybe"}
        assert np.array_equal(npz["output:label"], city_pipeline()[1].predict(city_frame(ROWS, 7)))
    with np.load(io.BytesIO(blob_for(FAMILIES[4])), allow_pickle=False) as npz:
        assert npz["input:x"].dtype == np.float64 and npz["output:y"].shape == (ROWS,)


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_a_candidate_whose_outputs_differ_fails_the_set_on_hub_and_agent(f: Family) -> None:
    blob = blob_for(f)
    with pytest.raises(BadRequest, match=r"agrees with the expected labels|differs from the expected values"):
        check_preflight(f.other(), blob)
    res = agent_preflight(f.other(), blob)
    assert not res.ok and res.reason == f.fails_with, res


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_a_candidate_with_other_input_names_is_refused_before_it_runs(f: Family) -> None:
    old, new = f.renamed
    other = rename_input(f.model(), old, new)
    res = agent_preflight(other, blob_for(f))
    assert not res.ok and res.reason == "preflight_run"
    assert f"'{old}'" in res.message and f"'{new}'" in res.message  # what the set has, what the candidate takes
    with pytest.raises(BadRequest, match=f"the candidate takes inputs .*'{new}'"):
        check_preflight(other, blob_for(f))


def test_string_labels_are_compared_by_agreement_with_a_tolerance() -> None:
    f = FAMILIES[3]
    blob = blob_for(f)
    s = agent_preflight(f.other(), blob)
    assert s.reason == "preflight_labels" and 0 < s.details["agreement"] < 1
    lenient = run_preflight(session(f.other()), load_preflight(blob),
                            PreflightParams(label_agreement=0.0, atol=1.0), PROFILE, clock=time.perf_counter)
    assert lenient.ok and lenient.details["agreement:label"] == s.details["agreement"]


def test_without_an_estimator_string_labels_come_from_onnx_runtime() -> None:
    model, _ = city_pipeline()
    blob = build_preflight(model, city_inputs(ROWS))
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        assert npz["output:label"].dtype.kind == "U"
    assert agent_preflight(model, blob).ok and agent_preflight(city_pipeline(shuffled=True)[0], blob).reason == \
        "preflight_labels"


@pytest.mark.parametrize("make", ["object_array", "both_forms", "ragged_inputs"])
def test_a_malformed_named_set_is_refused_by_agent_and_hub(make: str) -> None:
    good = blob_for(FAMILIES[3])
    with np.load(io.BytesIO(good), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    buf = io.BytesIO()
    if make == "object_array":  # strings as a pickled object array, as pandas would hand them out
        arrays["input:city"] = arrays["input:city"].astype(object)
        np.savez(buf, **arrays)
        why = "without pickles"
    elif make == "both_forms":
        np.savez(buf, input=np.zeros((ROWS, 1), np.float32), **arrays)
        why = "both 'input' and"
    else:
        arrays["input:x"] = arrays["input:x"][:-1]
        np.savez(buf, **arrays)
        why = "same number of rows"
    with pytest.raises(PreflightRejected, match=why) as exc:
        load_preflight(buf.getvalue())
    assert exc.value.reason == "preflight_blob"
    with pytest.raises(BadRequest, match=why):
        check_preflight(city_pipeline()[0], buf.getvalue())


def test_a_one_input_float_table_keeps_the_legacy_form() -> None:
    """Agents in the field read ``input`` only: a float table model still gets it, from an array
    or from a mapping alike."""
    with np.load(io.BytesIO(build_preflight(regressor(), {"x": np.ones((4, 4))}, rows=4))) as npz:
        assert npz.files == ["input:x", "output:y"]  # a double table: old agents could not feed it
    from tests.simulator import tiny_model

    x = np.random.default_rng(0).normal(size=(8, 2))
    for data in (x, {"x": x}):
        with np.load(io.BytesIO(build_preflight(tiny_model(2.0), data, rows=8)), allow_pickle=False) as npz:
            assert sorted(npz.files) == ["input", "output:y"]
            assert npz["input"].dtype == np.float32 and npz["input"].shape == (8, 2)


def test_the_hub_says_which_inputs_it_expected() -> None:
    with pytest.raises(BadRequest, match=r"has inputs \['a'\]; the model takes inputs \['a', 'b'\]"):
        build_preflight(two_inputs(), {"a": np.zeros((4, 3), np.float32)})
    with pytest.raises(BadRequest, match="pass the preflight data as a mapping of input name"):
        build_preflight(two_inputs(), np.zeros((4, 5), np.float32))
    with pytest.raises(BadRequest, match=r"same, non-zero number of rows, got \{'a': 4, 'b': 3\}"):
        build_preflight(two_inputs(), {"a": np.zeros((4, 3), np.float32), "b": np.zeros((3, 2), np.int64)})
    with pytest.raises(BadRequest, match=r"'b'.*does not convert to the model's tensor\(int64\)"):
        build_preflight(two_inputs(), {"a": np.zeros((4, 3), np.float32), "b": np.full((4, 2), "x")})


# --- comparisons per family ----------------------------------------------------------------------


def _tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p.astype(np.float64) - q.astype(np.float64)).sum(axis=1)


def _rel_l1(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    a, b = p.reshape(len(p), -1).astype(np.float64), q.reshape(len(q), -1).astype(np.float64)
    return np.abs(a - b).sum(axis=1) / (np.abs(a).sum(axis=1) + np.abs(b).sum(axis=1))


@pytest.mark.parametrize("f", FAMILIES, ids=IDS)
def test_identical_models_agree_on_every_row_at_zero_distance(f: Family) -> None:
    out = answer(f.model(), f.data())
    assert compare_outputs(out, answer(f.model(), f.data())) == (ROWS, ROWS, 0.0)


def test_a_perturbed_image_classifier_shows_the_total_variation_and_label_agreement() -> None:
    x = {"image": images(200, seed=3)}
    s, c = answer(cnn(), x), answer(cnn(0.3), x)
    agreed, n, dist = compare_outputs(s, c)
    assert n == 200 and agreed == int((s["label"] == c["label"]).sum())
    assert 0.5 < agreed / n < 0.95
    assert dist == pytest.approx(float(_tv(s["probabilities"], c["probabilities"]).sum()), rel=1e-9)


def test_a_perturbed_string_pipeline_agrees_on_string_labels() -> None:
    x = city_inputs(200, seed=9)
    s, c = answer(city_pipeline()[0], x), answer(city_pipeline(shuffled=True)[0], x)
    assert s["label"].dtype == object and isinstance(s["label"][0], str)
    agreed, n, dist = compare_outputs(s, c)
    assert n == 200 and agreed == int((s["label"] == c["label"]).sum()) and agreed / n < 0.8
    assert dist == pytest.approx(float(_tv(s["probabilities"], c["probabilities"]).sum()), rel=1e-9)


@pytest.mark.parametrize("f", [FAMILIES[1], FAMILIES[2], FAMILIES[4]], ids=["nd_output", "two_inputs", "flat_output"])
def test_perturbed_regressors_show_the_relative_l1_distance(f: Family) -> None:
    x = f.data()
    s, c = answer(f.model(), x), answer(f.other(), x)
    (name,) = s
    want = _rel_l1(s[name], c[name])
    agreed, n, dist = compare_outputs(s, c)
    assert n == ROWS and dist == pytest.approx(float(want.sum()), rel=1e-9) and dist > 0
    out = np.asarray(s[name])
    if out.ndim == 2 and out.shape[1] > 1:  # [N, K] scores without labels: the class they pick
        assert agreed == int((out.argmax(1) == np.asarray(c[name]).argmax(1)).sum())
    else:
        assert agreed == int((want <= REGRESSION_AGREEMENT).sum())
        assert agreed < n  # a 5 % weight change moves most rows by more than 1 %


# --- the shadow replay on real sessions ------------------------------------------------------------


class Counting:
    """A candidate's session that records the rows of every call (to see the batches)."""

    def __init__(self, blob: bytes) -> None:
        self.sess = session(blob)
        self.calls: list[int] = []

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        self.calls.append(len(next(iter(feeds.values()))))
        return self.sess.run(names, feeds)


@dataclass
class Candidate:
    name: str
    entry: ModelEntry
    session: Counting
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.entry.version


def shadow_pair(tmp_path: Path, stable: bytes, cand: bytes) -> tuple[ModelServer, CanaryRun, Counting]:
    path = tmp_path / "stable.onnx"
    path.write_bytes(stable)
    server = ModelServer()
    server.install(load("m", ModelEntry(version="1", sha256=SHA, size=len(stable), url="http://x/b"), path, PROFILE))
    counting = Counting(cand)
    candidate = Candidate("m", ModelEntry(version="2", sha256=SHA, size=len(cand), url="http://x/b"), counting,
                          tuple(i.name for i in counting.sess.get_inputs()),
                          tuple(o.name for o in counting.sess.get_outputs()))
    spec = CanarySpec(rollout="r-1", mode="shadow", fraction=1.0,
                      stable=ModelEntry(version="1", sha256=SHA, size=1, url="http://x/b"))
    run = CanaryRun(candidate=candidate, spec=spec, limits=CanaryLimits(min_samples=10_000),
                    on_drop=lambda r, v: None, linger_s=0.0)
    server.attach_canary("m", run)
    return server, run, counting


def test_the_shadow_batches_and_compares_string_inputs_of_any_length(tmp_path: Path) -> None:
    server, run, counting = shadow_pair(tmp_path, city_pipeline()[0], city_pipeline(shuffled=True)[0])
    x = city_inputs(40, seed=11)
    assert len({len(c) for c in x["city"].reshape(-1)}) > 1  # "nice" and "saint-etienne" in one batch
    for i in range(40):  # as an HTTP request sends them: nested lists, converted by the model server
        res = server.infer("m", {"city": [[str(x["city"][i, 0])]], "x": [[float(x["x"][i, 0])]]})
        assert res.version == "1"
    assert run.shadow is not None and run.shadow.process() == 40
    assert counting.calls[0] == 40  # one candidate call for the whole batch
    s, c = answer(city_pipeline()[0], x), answer(city_pipeline(shuffled=True)[0], x)
    w = run.stats.window()
    assert (w["requests"], w["compared"], w["errors"]) == (40, 40, 0)
    assert w["agreed"] == int((s["label"] == c["label"]).sum())
    assert w["output_distance_sum"] == pytest.approx(float(_tv(s["probabilities"], c["probabilities"]).sum()),
                                                     abs=1e-5)
    assert set(w["outputs"]["classes"]) <= {"yes", "no", "maybe"} and sum(w["outputs"]["classes"].values()) == 40


def test_the_shadow_batches_and_compares_image_inputs(tmp_path: Path) -> None:
    server, run, counting = shadow_pair(tmp_path, cnn(), cnn(0.3))
    x = images(30, seed=12)
    for i in range(30):
        server.infer("m", {"image": x[i : i + 1]})
    assert run.shadow is not None and run.shadow.process() == 30
    assert counting.calls[0] == 30
    s, c = answer(cnn(), {"image": x}), answer(cnn(0.3), {"image": x})
    w = run.stats.window()
    assert (w["requests"], w["compared"], w["agreed"]) == (30, 30, int((s["label"] == c["label"]).sum()))
    assert w["output_distance_sum"] == pytest.approx(float(_tv(s["probabilities"], c["probabilities"]).sum()),
                                                     abs=1e-5)


def test_one_long_string_does_not_pad_a_whole_shadow_batch() -> None:
    """Short strings batch together; a request with one long string among them replays alone
    rather than padding every row of the batch to its length."""
    from edgefleet.agent.app.shadow import MAX_STRING_BATCH_BYTES, _stack

    short = [({"city": np.array([["lyon"], ["oslo"]])}, None, 0.0) for _ in range(4)]
    stacked = _stack(short)  # type: ignore[arg-type]
    assert stacked is not None and stacked["city"].shape == (8, 1)
    long_text = "x" * (MAX_STRING_BATCH_BYTES // 4)
    mixed = [*short, ({"city": np.array([[long_text]] * 2)}, None, 0.0)]
    assert _stack(mixed) is None  # type: ignore[arg-type]
