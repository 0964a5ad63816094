"""What `publish` reads and how it lines data up with a model's inputs: .npy, .npz, .csv and
.parquet files with numbers and text, matched by name; clear refusals otherwise; and the publish
request built from a scikit-learn pipeline with a string column and from a LightGBM model."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightgbm
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from edgefleet.agent.contract.wire import Reference
from edgefleet.hub.adapters.modelfile import as_numbers, match_inputs, read_data
from edgefleet.hub.cli.commands import build_publish_request
from edgefleet.hub.cli.main import build_parser
from edgefleet.hub.errors import BadRequest


def _frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"city": rng.choice(["lyon", "oslo", "rome"], n), "x": rng.normal(size=n),
                         "y": rng.normal(size=n)})


def test_a_csv_with_a_header_gives_named_columns_of_text_as_written(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("city,x,zip\n Lyon,1.5,02134\n,2,02135\noslo,,\n")
    cols, digest, named = read_data(tmp_path / "d.csv")
    assert named and len(digest) == 64
    assert cols["city"].tolist() == [" Lyon", None, "oslo"]  # as written: no stripping
    assert cols["zip"].tolist() == ["02134", "02135", None]
    x = as_numbers(cols["x"])
    assert x is not None and x[:2].tolist() == [1.5, 2.0] and np.isnan(x[2])
    assert as_numbers(cols["city"]) is None


def test_the_model_decides_whether_a_column_is_numbers_or_categories() -> None:
    cols = {"zip": np.array(["02134", "02135", None], dtype=object)}
    text = match_inputs(cols, True, [("zip", "tensor(string)", 1)], "d.csv")
    assert text["zip"].reshape(-1).tolist() == ["02134", "02135", None]
    numbers = match_inputs(cols, True, [("zip", "tensor(float)", 1)], "d.csv")
    assert numbers["zip"][:2, 0].tolist() == [2134.0, 2135.0] and np.isnan(numbers["zip"][2, 0])


def test_a_csv_without_header_is_one_numeric_table(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("1,2\n3,4\n")
    cols, _, named = read_data(tmp_path / "d.csv")
    assert not named and cols[""].shape == (2, 2)


def test_a_parquet_file_reads_like_the_csv(tmp_path: Path) -> None:
    df = _frame(20)
    df.loc[3, "city"] = None
    df.to_parquet(tmp_path / "d.parquet")
    df.to_csv(tmp_path / "d.csv", index=False)
    pq, _, _ = read_data(tmp_path / "d.parquet")
    csv, _, _ = read_data(tmp_path / "d.csv")
    assert pq["city"].tolist() == csv["city"].tolist() and pq["city"][3] is None
    np.testing.assert_allclose(pq["x"], as_numbers(csv["x"]))  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "match"), [
    ("a,b\n1,2\n3\n", "line 3 has 1 fields, the first line has 2"),
    ("a,a\n1,2\n", "distinct, non-empty column names"),
    ("", "is empty"),
])
def test_malformed_csv_is_refused_with_what_was_expected(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(BadRequest, match=match):
        read_data(tmp_path / "d.csv")


def test_other_suffixes_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(BadRequest, match=r"must be \.npy, \.npz, \.csv or \.parquet"):
        read_data(tmp_path / "d.json")


def test_columns_match_inputs_by_name_and_numeric_columns_feed_one_input() -> None:
    cols = {"city": np.array(["a", "b"], dtype=object), "x": np.array([1.0, 2.0]), "extra": np.array([0.0, 0.0])}
    got = match_inputs(cols, True, [("x", "tensor(float)", 1), ("city", "tensor(string)", 1)], "d.csv")
    assert list(got) == ["x", "city"] and got["city"].shape == (2, 1)
    two = {"a": np.array(["1", "2"], dtype=object), "b": np.array([3.0, 4.0])}
    table = match_inputs(two, True, [("input", "tensor(float)", 2)], "d.csv")
    assert table["input"].tolist() == [[1.0, 3.0], [2.0, 4.0]]
    # an estimator's own column order wins over the file's, and other columns are left out
    ordered = match_inputs({**two, "target": np.array([0.0, 1.0])}, True, [("input", "tensor(float)", None)], "d.csv",
                           order=["b", "a"])
    assert ordered["input"].tolist() == [[3.0, 1.0], [4.0, 2.0]]


I2 = [("x", "tensor(float)", 1), ("y", "tensor(float)", 1)]


@pytest.mark.parametrize(("cols", "inputs", "fname", "order", "match"), [
    ({"a": np.zeros(3)}, I2, "d.csv", None, r"the model's inputs \['x', 'y'\]"),
    ({"x": np.zeros(3), "z": np.zeros(3)}, [("x", "tensor(float)", 1)], "d.npz", None, "exactly the model's inputs"),
    ({"city": np.array(["a", "b"], dtype=object)}, [("input", "tensor(float)", 1)], "d.csv", None,
     r"columns \['city'\] hold text such as 'a'"),
    ({"a": np.zeros(3), "b": np.zeros(3), "y": np.zeros(3)}, [("input", "tensor(float)", 2)], "d.csv", None,
     r"takes 2 columns, the file has 3: \['a', 'b', 'y'\] \(leave out the target"),
    ({"a": np.zeros(3)}, [("input", "tensor(float)", None)], "d.csv", ["a", "b"], r"fitted on columns .* lacks \['b'\]"),
    ({"x": np.array(["a", "b"], dtype=object)}, [("x", "tensor(float)", 1)], "d.csv", None,
     "input 'x' is tensor.float., the data for it is text such as 'a'"),
    ({"x": np.zeros(2)}, [("x", "tensor(string)", 1)], "d.csv", None, "input 'x' is tensor.string., the data for it is numbers"),
    ({"x": np.zeros(3), "y": np.zeros(4)}, I2, "d.csv", None, "same number of samples"),
])
def test_data_that_does_not_fit_the_model_is_refused(cols: dict[str, np.ndarray], inputs: list[tuple[str, str, int | None]],
                                                     fname: str, order: list[str] | None, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        match_inputs(cols, True, inputs, fname, order)


def test_a_numeric_table_from_a_csv_follows_the_estimators_columns(tmp_path: Path) -> None:
    """A scikit-learn model fitted on a DataFrame whose columns the CSV holds in another order, with
    the target beside them: the reference's f0, f1 are the estimator's columns, in its order."""
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"b": rng.normal(10, 1, 300), "a": rng.normal(0, 1, 300)})
    model = LogisticRegression().fit(df, (df["a"] > 0).astype(int))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(model))
    df[["a", "b"]].assign(target=0).to_csv(tmp_path / "d.csv", index=False)  # a, b and the target, in another order
    ref = Reference.from_dict(_publish(str(tmp_path / "m.pkl"), "--reference", str(tmp_path / "d.csv"))["reference"])  # type: ignore[arg-type]
    f0, f1 = ref.features
    assert 5 < f0.edges[0] < f0.edges[-1] < 15  # b (around 10), the estimator's first column
    assert -5 < f1.edges[0] < f1.edges[-1] < 5  # a (around 0); no third column (the target)


def _publish(*argv: str) -> dict[str, object]:
    return build_publish_request(build_parser().parse_args(["publish", *argv, "--name", "m", "--version", "1"]))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_pipeline_with_a_string_column_publishes_one_input_per_column(tmp_path: Path, suffix: str) -> None:
    df = _frame()
    pipe = Pipeline([("cols", ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])],
                                                remainder="passthrough")), ("clf", LogisticRegression())])
    pipe.fit(df, (df["city"] == "lyon") | (df["x"] > 0))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(pipe))
    data = tmp_path / f"d{suffix}"
    df.to_csv(data, index=False) if suffix == ".csv" else df.to_parquet(data)
    req = _publish(str(tmp_path / "m.pkl"), "--reference", str(data), "--preflight", str(data))
    ref = Reference.from_dict(req["reference"])  # type: ignore[arg-type]
    assert [c.name for c in ref.categories] == ["city"] and set(ref.categories[0].extra["categories"]) == {
        "lyon", "oslo", "rome"}
    assert [f.name for f in ref.features] == ["x", "y"]
    assert [f.name for f in ref.more_outputs] == ["output.probabilities.confidence"]
    assert set((ref.output or {})["classes"]) == {"0", "1"}
    assert req["preflight"] is not None
    assert req["lineage"]["training_rows"] == 300  # type: ignore[index]


def test_a_lightgbm_model_publishes_through_onnxmltools(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    model = lightgbm.LGBMClassifier(n_estimators=10, num_leaves=7, verbose=-1).fit(x, (x[:, 0] > 0).astype(int))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(model))
    np.save(tmp_path / "x.npy", x)
    req = _publish(str(tmp_path / "m.pkl"), "--reference", str(tmp_path / "x.npy"), "--preflight",
                   str(tmp_path / "x.npy"))
    assert str(req["lineage"]["converted_from"]).startswith("onnxmltools:lightgbm")  # type: ignore[index]
    ref = Reference.from_dict(req["reference"])  # type: ignore[arg-type]
    assert [f.name for f in ref.features] == ["f0", "f1", "f2", "f3"]
    assert req["preflight"] is not None


def test_a_lightgbm_pipeline_with_a_string_column_publishes_one_input_per_column(tmp_path: Path) -> None:
    df = _frame()
    pipe = Pipeline([("cols", ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])],
                                                remainder="passthrough")),
                     ("gbm", lightgbm.LGBMClassifier(n_estimators=10, num_leaves=7, verbose=-1))])
    pipe.fit(df, ((df["city"] == "lyon") | (df["x"] > 0)).astype(int))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(pipe))
    df.to_csv(tmp_path / "d.csv", index=False)
    req = _publish(str(tmp_path / "m.pkl"), "--reference", str(tmp_path / "d.csv"), "--preflight",
                   str(tmp_path / "d.csv"), "--label-agreement", "0.99")
    assert str(req["lineage"]["converted_from"]).startswith("onnxmltools:sklearn.pipeline")  # type: ignore[index]
    ref = Reference.from_dict(req["reference"])  # type: ignore[arg-type]
    assert [c.name for c in ref.categories] == ["city"] and [f.name for f in ref.features] == ["x", "y"]
    assert req["preflight"] is not None


def test_hide_unseen_keeps_a_columns_new_values_on_the_device(tmp_path: Path) -> None:
    from edgefleet.agent.contract.histograms import category_histogram

    df = _frame()
    pipe = Pipeline([("cols", ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])],
                                                remainder="passthrough")), ("clf", LogisticRegression())])
    pipe.fit(df, (df["x"] > 0).astype(int))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(pipe))
    df.to_csv(tmp_path / "d.csv", index=False)
    req = _publish(str(tmp_path / "m.pkl"), "--reference", str(tmp_path / "d.csv"), "--hide-unseen", "city")
    (city,) = Reference.from_dict(req["reference"]).categories  # type: ignore[arg-type]
    h = category_histogram(np.array(["ada@example.org", "lyon"], dtype=object), city)
    assert h["above"] == 1 and "unseen" not in h
    with pytest.raises(BadRequest, match=r"--hide-unseen \['x'\]: not text columns"):
        _publish(str(tmp_path / "m.pkl"), "--reference", str(tmp_path / "d.csv"), "--hide-unseen", "x")
