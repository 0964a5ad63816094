"""Open Inference Protocol v2 (KServe V2 REST) over HTTP/1.1 keep-alive, stdlib only.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (also under
``/versions/{version}/``). Responses name the model version that produced them and carry its
sha256 prefix and the request id in ``parameters``. Bound to 127.0.0.1 by default.

The binary tensor data extension (KServe/Triton ``binary_tensor_data``) is supported both ways:
a request whose ``Inference-Header-Content-Length`` header gives the size of its JSON part may
carry inputs as raw little-endian bytes after it (``parameters.binary_data_size`` per input), and
outputs are returned as raw bytes when asked (``parameters.binary_data_output`` on the request,
or ``parameters.binary_data`` on a requested output). At batch 64 this skips most of the JSON
encoding and decoding that otherwise costs more than the model.

JSON goes through orjson (strict RFC 8259: UTF-8 only, no NaN literals in requests; numpy arrays
encoded natively, FP32 outputs in their shortest float32 form). JSON has no NaN or infinity: such
output values are written as ``null`` (the binary extension returns them bit for bit).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import orjson

from edgefleet.agent import __version__
from edgefleet.agent.adapters.httpserver import BoundedHTTPServer, HttpError, QuietHandler, read_body
from edgefleet.agent.contract.errors import InferenceError, UnknownModel

__all__ = ["Models", "OipServer"]


# --- the port: what the server needs of the agent's model server (agent.app.serving.ModelServer) ---


class _Session(Protocol):
    def get_inputs(self) -> Any: ...
    def get_outputs(self) -> Any: ...


class _Entry(Protocol):
    @property
    def sha256(self) -> str: ...


class _Model(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def session(self) -> _Session: ...
    @property
    def entry(self) -> _Entry: ...


class _Result(Protocol):
    model: str
    version: str
    sha256: str
    request_id: str
    outputs: dict[str, Any]


class Models(Protocol):
    """The models served here; ``get`` and ``infer`` raise ``UnknownModel`` / ``InferenceError``."""

    def models(self) -> Mapping[str, Any]: ...
    def get(self, name: str) -> _Model: ...
    def infer(self, name: str, inputs: Mapping[str, Any], *, request_id: str | None = ...,
              allow_canary: bool = ...) -> _Result: ...

TO_NUMPY = {
    "FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
    "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_, "BYTES": np.object_,
}  # fmt: skip
FROM_NUMPY = {
    "float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32",
    "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}  # fmt: skip
ORT_TO_OIP = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
    "tensor(int32)": "INT32", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}  # fmt: skip
MAX_BODY = 16 * 1024 * 1024
# Local applications hold keep-alive connections; a connection idle (or dripping a request) this
# long is closed, and one past the cap is answered 503 at once (agent.adapters.httpserver).
MAX_CONNECTIONS = 64
CONNECTION_TIMEOUT = 30.0


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Request:
    """A decoded infer request: feeds, request id, and which outputs go back as raw bytes."""

    __slots__ = ("binary_all", "binary_outputs", "feeds", "rid")

    def __init__(self, feeds: dict[str, Any], rid: str | None, binary_all: bool,
                 binary_outputs: frozenset[str]) -> None:
        self.feeds, self.rid = feeds, rid
        self.binary_all, self.binary_outputs = binary_all, binary_outputs


def _params(obj: Any, where: str) -> dict[str, Any]:
    p = obj.get("parameters") or {}
    if not isinstance(p, dict):
        raise _BadRequest(400, f"{where}.parameters must be an object, got {type(p).__name__}")
    return p


def _decode_inputs(body: bytes, header_length: int | None = None) -> _Request:
    """``header_length`` (from ``Inference-Header-Content-Length``): the JSON part's size; the
    rest of the body is the binary data of the inputs that name a ``binary_data_size``, in order."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise _BadRequest(400, f"Inference-Header-Content-Length is {header_length}, expected 1 to "
                               f"{len(body)} (the size of the JSON part of this {len(body)}-byte body)")
    head = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(head):]
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(400, f"request body is not JSON: {exc}") from exc
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise _BadRequest(400, "expected a JSON object with an 'inputs' list (OIP v2 infer)")
    feeds: dict[str, Any] = {}
    offset = 0
    for i, t in enumerate(req["inputs"]):
        if not isinstance(t, dict) or not {"name", "shape", "datatype"} <= set(t):
            raise _BadRequest(400, f"inputs[{i}] needs name, shape, datatype and data")
        dtype = TO_NUMPY.get(t["datatype"])
        if dtype is None:
            raise _BadRequest(400, f"inputs[{i}].datatype {t['datatype']!r} is not one of {sorted(TO_NUMPY)}")
        size = _params(t, f"inputs[{i}]").get("binary_data_size")
        try:
            if size is not None:
                if dtype is np.object_:
                    raise _BadRequest(400, f"inputs[{i}]: BYTES tensors are only accepted as JSON data")
                if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                    raise _BadRequest(400, f"inputs[{i}].parameters.binary_data_size is {size!r}, expected "
                                           f"0 to {len(binary) - offset} (the binary bytes left in the body)")
                arr: Any = np.frombuffer(binary[offset:offset + size], dtype=np.dtype(dtype).newbyteorder("<"))
                arr = arr.reshape(t["shape"])
                offset += size
            elif "data" in t:
                arr = np.asarray(t["data"], dtype=dtype).reshape(t["shape"])
            else:
                raise _BadRequest(400, f"inputs[{i}] needs name, shape, datatype and data "
                                       "(or parameters.binary_data_size)")
        except (TypeError, ValueError, OverflowError) as exc:
            raise _BadRequest(400, f"inputs[{i}] ({t['name']}): data does not fit shape {t['shape']}: {exc}") from exc
        feeds[str(t["name"])] = arr
    if offset != len(binary):
        raise _BadRequest(400, f"the body has {len(binary) - offset} binary bytes that no input claims "
                               "(check each input's binary_data_size)")
    rid = req.get("id")
    outs = req.get("outputs") or []
    if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
        raise _BadRequest(400, "outputs must be a list of objects")
    binary_outputs = frozenset(str(o.get("name")) for o in outs
                               if _params(o, "outputs[]").get("binary_data") is True)
    binary_all = _params(req, "request").get("binary_data_output") is True
    return _Request(feeds, rid if isinstance(rid, str) and rid else None, binary_all, binary_outputs)


def _tensor_meta(specs: Any) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "datatype": ORT_TO_OIP.get(s.type, s.type), "shape": [d if isinstance(d, int) else -1 for d in s.shape]}
        for s in specs
    ]


class _Handler(QuietHandler):
    server: _Server

    def _send(self, status: int, obj: Any, binary: list[bytes] | None = None) -> None:
        body = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
        self.send_response(status)
        if binary:
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Inference-Header-Content-Length", str(len(body)))
            self.send_header("Content-Length", str(len(body) + sum(len(b) for b in binary)))
        else:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        for chunk in binary or ():
            self.wfile.write(chunk)

    def _parts(self) -> list[str]:
        return [p for p in self.path.split("?", 1)[0].split("/") if p]

    def do_GET(self) -> None:
        models = self.server.models
        parts = self._parts()
        try:
            if parts == ["v2"]:
                return self._send(200, {"name": "edgefleet-agent", "version": __version__,
                                        "extensions": ["binary_tensor_data"]})
            if parts == ["v2", "health", "live"]:
                return self._send(200, {"live": True})
            if parts == ["v2", "health", "ready"]:
                ready = bool(models.models())
                return self._send(200 if ready else 503, {"ready": ready})
            if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
                m = models.get(parts[2])
                if len(parts) == 4 and parts[3] == "ready":
                    return self._send(200, {"name": m.name, "ready": True})
                if len(parts) == 3:
                    return self._send(200, {
                        "name": m.name,
                        "versions": [m.version],
                        "platform": "onnxruntime_onnx",
                        "inputs": _tensor_meta(m.session.get_inputs()),
                        "outputs": _tensor_meta(m.session.get_outputs()),
                        "parameters": {"sha256": m.entry.sha256},
                    })
            return self._send(404, {"error": f"no such endpoint: GET {self.path}"})
        except UnknownModel as exc:
            return self._send(404, {"error": str(exc)})

    def do_POST(self) -> None:
        parts = self._parts()
        try:
            body = read_body(self, MAX_BODY)
        except HttpError as exc:
            return self._send(exc.status, {"error": str(exc)})
        version = None
        if len(parts) == 6 and parts[3] == "versions":
            version, parts = parts[4], parts[:3] + parts[5:]
        if not (len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer"):
            return self._send(404, {"error": f"no such endpoint: POST {self.path}"})
        try:
            raw_len = self.headers.get("Inference-Header-Content-Length")
            try:
                header_length = int(raw_len) if raw_len is not None else None
            except ValueError:
                raise _BadRequest(400, f"Inference-Header-Content-Length must be an integer, got {raw_len!r}") from None
            req = _decode_inputs(body, header_length)
            if version is not None and self.server.models.get(parts[2]).version != version:
                raise UnknownModel(f"model {parts[2]} does not serve version {version!r} here")
            res = self.server.models.infer(parts[2], req.feeds, request_id=req.rid, allow_canary=version is None)
        except _BadRequest as exc:
            return self._send(exc.status, {"error": str(exc)})
        except UnknownModel as exc:
            return self._send(404, {"error": str(exc)})
        except InferenceError as exc:
            return self._send(400, {"error": str(exc)})
        outputs = []
        binary: list[bytes] = []
        for oname, arr in res.outputs.items():
            a = np.asarray(arr)
            dt = FROM_NUMPY.get(a.dtype.name, "BYTES")
            out: dict[str, Any] = {"name": oname, "datatype": dt, "shape": list(a.shape)}
            if dt != "BYTES" and (req.binary_all or oname in req.binary_outputs):
                raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
                out["parameters"] = {"binary_data_size": len(raw)}
                binary.append(raw)
            else:
                out["data"] = np.ascontiguousarray(a).reshape(-1) if dt != "BYTES" else [str(x) for x in a.reshape(-1)]
            outputs.append(out)
        return self._send(200, {
            "model_name": res.model,
            "model_version": res.version,
            "id": res.request_id,
            "parameters": {"sha256": res.sha256[:12], "request_id": res.request_id},
            "outputs": outputs,
        }, binary)


class _Server(BoundedHTTPServer):
    models: Models


class OipServer:
    """The local inference endpoint. ``start`` binds (port 0 picks a free one)."""

    def __init__(self, models: Models, host: str = "127.0.0.1", port: int = 8500, *,
                 max_connections: int = MAX_CONNECTIONS, timeout: float = CONNECTION_TIMEOUT) -> None:
        self._httpd = _Server((host, port), _Handler, max_connections=max_connections, timeout=timeout)
        self._httpd.models = models
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="oip-http", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Serving: started, and its thread has not ended (stopped or crashed)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
