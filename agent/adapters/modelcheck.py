"""Structural checks on a model from outside, before ONNX Runtime ever sees it.

A blob that passed its signature and hash is still *untrusted input* to the parser: it may point
at external data files (a path-traversal vector), use custom operator domains that would load
native code, or simply be malformed. :func:`check_model_bytes` parses without touching the
filesystem and refuses such models with :class:`~agent.contract.errors.ModelRejected`.

External data is looked for in every tensor the format can carry, not only the main graph's
initializers: subgraphs, local functions and their default attributes, training graphs, node
attributes (``t``, ``tensors``, ``sparse_tensor``, ``sparse_tensors``), and both halves of sparse
tensors. The walk follows the protobuf schema itself (:func:`_walk`), so it cannot fall behind it.
Defence in depth: sessions are opened from bytes with the working directory set to an empty
folder (the agent's and the guard child's), so a relative location would find nothing.

``onnx`` is imported on first use: on a device the check runs in the session-guard child
(:mod:`agent.adapters.sandbox_child`), so the long-running agent never pays the ~8 MiB the module costs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgefleet.agent.contract.errors import ModelRejected

__all__ = ["ALLOWED_DOMAINS", "check_model_bytes"]

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MAX_OPSET = {"": 23, "ai.onnx": 23, "ai.onnx.ml": 5}


def _message_fields(descriptor: Any) -> tuple[tuple[str, bool], ...]:
    """(name, repeated) of the fields of a message type that hold messages, cached per type."""
    cached = _FIELDS.get(descriptor.full_name)
    if cached is None:
        cached = tuple((f.name, f.label == f.LABEL_REPEATED) for f in descriptor.fields
                       if f.type == f.TYPE_MESSAGE)
        _FIELDS[descriptor.full_name] = cached
    return cached


_FIELDS: dict[str, tuple[tuple[str, bool], ...]] = {}


def _walk(model: Any) -> Iterator[tuple[str, Any]]:
    """Every message inside ``model`` with a readable path, depth first: graphs, subgraphs,
    functions, training graphs, attributes, sparse tensors' values *and* indices. Generic over
    the protobuf schema, so a tensor-bearing field added to the format is covered without a
    change here. Only message fields are read: large ``raw_data`` payloads are never copied."""
    stack: list[tuple[str, Any]] = [("model", model)]
    while stack:
        path, msg = stack.pop()
        yield path, msg
        for name, repeated in _message_fields(msg.DESCRIPTOR):
            if repeated:
                items = getattr(msg, name)
                stack.extend((f"{path}.{name}[{i}]", m) for i, m in enumerate(items))
            elif msg.HasField(name):
                stack.append((f"{path}.{name}", getattr(msg, name)))


def _external(tensor: Any) -> bool:
    import onnx  # lazily: see the module docstring

    return bool(tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data))


def check_model_bytes(data: bytes) -> Any:
    """Parse and check an ONNX model; return the ``ModelProto`` or raise ModelRejected."""
    import onnx  # lazily: see the module docstring

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelRejected(f"not a parseable ONNX model: {exc}", reason="model_malformed") from exc
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS:
            raise ModelRejected(
                f"model imports operator domain {opset.domain!r}; allowed are "
                f"{sorted(ALLOWED_DOMAINS)} (custom domains can load native code)",
                reason="model_domain",
            )
        if opset.version > MAX_OPSET[opset.domain]:
            raise ModelRejected(
                f"model needs opset {opset.version} of {opset.domain or 'ai.onnx'!r}; this agent "
                f"allows up to {MAX_OPSET[opset.domain]}",
                reason="model_opset",
            )
    for path, msg in _walk(model):
        kind = msg.DESCRIPTOR.name
        if kind == "TensorProto" and _external(msg):
            raise ModelRejected(
                f"tensor {msg.name!r} ({path}) keeps its data in an external file; edgefleet "
                "only runs self-contained models (re-export without external data)",
                reason="model_external_data",
            )
        if kind == "NodeProto" and msg.domain not in ALLOWED_DOMAINS:
            raise ModelRejected(
                f"node {msg.name!r} ({msg.op_type}, {path}) is in domain {msg.domain!r}; allowed "
                f"are {sorted(ALLOWED_DOMAINS)}",
                reason="model_domain",
            )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelRejected(f"onnx.checker refused the model: {exc}", reason="model_invalid") from exc
    return model
