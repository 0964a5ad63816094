"""Structural checks on a model from outside, before ONNX Runtime ever sees it.

A blob that passed its signature and hash is still *untrusted input* to the parser: it may point
at external data files (a path-traversal vector), use custom operator domains that would load
native code, or simply be malformed. :func:`check_model_bytes` parses without touching the
filesystem and refuses such models with :class:`~agent.contract.errors.ModelRejected`.

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


def _graphs(graph: Any) -> Iterator[Any]:
    import onnx  # lazily: see the module docstring

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


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
    for g in _graphs(model.graph):
        for t in list(g.initializer) + [s.values for s in g.sparse_initializer]:
            if _external(t):
                raise ModelRejected(
                    f"initializer {t.name!r} keeps its data in an external file; edgefleet "
                    "only runs self-contained models (re-export without external data)",
                    reason="model_external_data",
                )
        for node in g.node:
            if node.domain not in ALLOWED_DOMAINS:
                raise ModelRejected(
                    f"node {node.name!r} ({node.op_type}) is in domain {node.domain!r}; allowed "
                    f"are {sorted(ALLOWED_DOMAINS)}",
                    reason="model_domain",
                )
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and _external(attr.t):
                    raise ModelRejected(
                        f"node {node.name!r} has a constant with external data",
                        reason="model_external_data",
                    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelRejected(f"onnx.checker refused the model: {exc}", reason="model_invalid") from exc
    return model
