"""The local OIP v2 endpoint over real HTTP on a real ONNX Runtime session: JSON tensors, the
binary tensor data extension both ways, and the errors a client gets for malformed requests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from edgefleet.agent.adapters.oip import OipServer
from edgefleet.agent.app.serving import ModelServer, load
from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.wire import ModelEntry

HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ort.InferenceSession]]:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    onx = to_onnx(LogisticRegression().fit(X, y), X[:1], options={"zipmap": False})
    data = onx.SerializeToString()
    path: Path = tmp_path_factory.mktemp("oip") / "m.onnx"
    path.write_bytes(data)
    entry = ModelEntry(version="7", sha256=hashlib.sha256(data).hexdigest(), size=len(data), url="http://x/")
    models = ModelServer()
    models.install(load("clf", entry, path, DeviceProfile(name="t")))
    server = OipServer(models, port=0)
    server.start()
    host, port = server.address
    try:
        yield f"http://{host}:{port}", ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    finally:
        server.stop()


def _expected(sess: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    label, prob = sess.run(None, {sess.get_inputs()[0].name: x})
    return label, prob


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)


def _binary_response(resp: httpx.Response) -> dict[str, np.ndarray]:
    """Split a binary-extension response into named arrays (JSON ones included)."""
    n = int(resp.headers[HEADER])
    head = json.loads(resp.content[:n])
    rest, out = resp.content[n:], {}
    for o in head["outputs"]:
        dtype = {"FP32": "<f4", "INT64": "<i8"}[o["datatype"]]
        if "data" in o:
            out[o["name"]] = np.asarray(o["data"], dtype=dtype).reshape(o["shape"])
            continue
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(rest[:size], dtype=dtype).reshape(o["shape"])
        rest = rest[size:]
    assert rest == b""
    return out


def test_server_metadata_announces_the_binary_extension(served: tuple[str, ort.InferenceSession]) -> None:
    url, _ = served
    assert "binary_tensor_data" in httpx.get(url + "/v2").json()["extensions"]


def test_json_request_and_response_match_onnx_runtime(served: tuple[str, ort.InferenceSession]) -> None:
    url, sess = served
    x = _rows(8)
    body = {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    resp = httpx.post(url + "/v2/models/clf/infer", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json" and HEADER not in resp.headers
    out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in resp.json()["outputs"]}
    label, prob = _expected(sess, x)
    assert resp.json()["model_version"] == "7"
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_allclose(out["probabilities"], prob, rtol=1e-6)


def test_binary_inputs_and_binary_outputs(served: tuple[str, ort.InferenceSession]) -> None:
    url, sess = served
    x = _rows(64)
    raw = x.astype("<f4").tobytes()
    head = json.dumps({
        "inputs": [{"name": "X", "shape": [64, 5], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    resp = httpx.post(url + "/v2/models/clf/infer", content=head + raw,
                      headers={HEADER: str(len(head)), "Content-Type": "application/octet-stream"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    out = _binary_response(resp)
    label, prob = _expected(sess, x)
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_array_equal(out["probabilities"], prob)  # bit for bit: no text round trip


def test_binary_output_for_one_named_output_only(served: tuple[str, ort.InferenceSession]) -> None:
    url, sess = served
    x = _rows(4)
    body = {"inputs": [{"name": "X", "shape": [4, 5], "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}]}
    resp = httpx.post(url + "/v2/models/clf/infer", json=body)
    assert resp.status_code == 200, resp.text
    head = json.loads(resp.content[: int(resp.headers[HEADER])])
    kinds = {o["name"]: ("data" in o, "parameters" in o) for o in head["outputs"]}
    assert kinds == {"label": (True, False), "probabilities": (False, True)}
    out = _binary_response(resp)
    np.testing.assert_array_equal(out["probabilities"], _expected(sess, x)[1])


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("size_too_big", "binary_data_size is 999"),
        ("left_over", "binary bytes that no input claims"),
        ("header_too_long", "Inference-Header-Content-Length is"),
        ("header_not_int", "must be an integer"),
        ("bytes_binary", "BYTES tensors are only accepted as JSON"),
        ("no_data", "or parameters.binary_data_size"),
        ("bad_shape", "does not fit shape"),
    ],
)
def test_malformed_binary_requests_get_a_400_saying_what_was_expected(
    served: tuple[str, ort.InferenceSession], case: str, expect: str
) -> None:
    url, _ = served
    raw = _rows(2).astype("<f4").tobytes()
    size = {"size_too_big": 999}.get(case, len(raw))
    datatype = "BYTES" if case == "bytes_binary" else "FP32"
    shape = [3, 5] if case == "bad_shape" else [2, 5]
    params = {} if case == "no_data" else {"parameters": {"binary_data_size": size}}
    head = json.dumps({"inputs": [{"name": "X", "shape": shape, "datatype": datatype, **params}]}).encode()
    body = head + raw + (b"xx" if case == "left_over" else b"")
    header = {"header_too_long": str(len(body) + 1), "header_not_int": "ten"}.get(case, str(len(head)))
    resp = httpx.post(url + "/v2/models/clf/infer", content=body, headers={HEADER: header})
    assert resp.status_code == 400
    assert expect in resp.json()["error"]
    # the endpoint keeps serving after every refusal
    assert httpx.get(url + "/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b'{"inputs": [{"name": "X", "shape": [1, 5], "datatype": "FP32", "data": [NaN, 0, 0, 0, 0]}]}',
         "request body is not JSON"),
        ('{"inputs": [], "id": "\u00e9"}'.encode("utf-16"), "request body is not JSON"),
        (b'{"inputs": [{"name": "X", "shape": [1, 5], "datatype": "INT64", "data": [1e30, 0, 0, 0, 0]}]}',
         "does not fit shape"),
        (b'{"inputs": [{"name": "X", "shape": [1, 5], "datatype": "INT64", '
         b'"data": [123456789012345678901234567890, 0, 0, 0, 0]}]}', "does not fit shape"),
    ],
    ids=["nan_literal", "utf16", "float_too_big_for_int64", "int_beyond_64_bits"],
)
def test_json_that_is_not_strict_rfc8259_or_does_not_fit_the_datatype_gets_a_400(
    served: tuple[str, ort.InferenceSession], body: bytes, expect: str
) -> None:
    url, _ = served
    resp = httpx.post(url + "/v2/models/clf/infer", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert expect in resp.json()["error"]


def test_nan_outputs_are_json_null_and_exact_in_binary(served: tuple[str, ort.InferenceSession]) -> None:
    """JSON has no NaN: a NaN output is ``null`` in a JSON response (valid JSON, which a strict
    parser accepts), and NaN bit for bit with the binary extension."""
    url, sess = served
    x = _rows(2).astype("<f4")
    x[0, 0] = np.nan
    raw = x.tobytes()
    head = json.dumps({"inputs": [{"name": "X", "shape": [2, 5], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    resp = httpx.post(url + "/v2/models/clf/infer", content=head + raw, headers={HEADER: str(len(head))})
    assert resp.status_code == 200, resp.text
    prob = json.loads(resp.content, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    prob = {o["name"]: o["data"] for o in prob["outputs"]}["probabilities"]
    expected = _expected(sess, x)[1].reshape(-1)
    assert np.isnan(expected[:2]).all() and prob[:2] == [None, None]
    np.testing.assert_allclose(np.asarray(prob[2:], dtype=np.float32), expected[2:], rtol=0)
    head = json.dumps({"inputs": [{"name": "X", "shape": [2, 5], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    resp = httpx.post(url + "/v2/models/clf/infer", content=head + raw, headers={HEADER: str(len(head))})
    np.testing.assert_array_equal(_binary_response(resp)["probabilities"], _expected(sess, x)[1])
