"""Structural checks on untrusted models: external data is refused wherever the format can hold a
tensor (agent.adapters.modelcheck), not only in the main graph's initializers."""

from __future__ import annotations

from collections.abc import Callable

import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.adapters.modelcheck import check_model_bytes
from edgefleet.agent.contract.errors import ModelRejected
from tests.simulator import tiny_model


def _external(t: TensorProto, location: str = "../../../etc/passwd") -> TensorProto:
    for f in ("float_data", "int64_data", "raw_data"):
        t.ClearField(f)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "8")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _sparse(external: str) -> onnx.SparseTensorProto:
    values = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    _external(values if external == "values" else indices)
    return helper.make_sparse_tensor(values, indices, [4])


def _model(nodes: list[onnx.NodeProto], **graph_kw: object) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              **graph_kw)  # type: ignore[arg-type]
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def constant_sparse_values() -> onnx.ModelProto:
    return _model([helper.make_node("Constant", [], ["y"], sparse_value=_sparse("values"))])


def constant_sparse_indices() -> onnx.ModelProto:
    return _model([helper.make_node("Constant", [], ["y"], sparse_value=_sparse("indices"))])


def sparse_initializer_indices() -> onnx.ModelProto:
    return _model([helper.make_node("Identity", ["w"], ["y"])], sparse_initializer=[_sparse("indices")])


def tensors_attribute() -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT, [4], [0.0] * 4))
    node.attribute.append(helper.make_attribute("extra", [_external(helper.make_tensor("t", TensorProto.FLOAT, [1], [1.0]))]))
    return _model([node])


def subgraph_initializer() -> onnx.ModelProto:
    inner = helper.make_graph([helper.make_node("Identity", ["w"], ["z"])], "then", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
                              initializer=[_external(helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4))])
    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("b", TensorProto.BOOL, [], [True]))
    return _model([cond, helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)])


def training_graph_initializer() -> onnx.ModelProto:
    model = onnx.load_model_from_string(tiny_model(1.0))
    init = helper.make_graph([], "init", [], [],
                             initializer=[_external(helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0]))])
    model.training_info.add().initialization.CopyFrom(init)
    return model


def function_default_attribute() -> onnx.ModelProto:
    model = onnx.load_model_from_string(tiny_model(1.0))
    fn = model.functions.add()
    fn.name, fn.domain = "f", ""
    fn.attribute_proto.append(helper.make_attribute("value", _external(helper.make_tensor("d", TensorProto.FLOAT, [1], [1.0]))))
    return model


@pytest.mark.parametrize("build", [constant_sparse_values, constant_sparse_indices, sparse_initializer_indices,
                                   tensors_attribute, subgraph_initializer, training_graph_initializer,
                                   function_default_attribute])
def test_external_data_is_refused_in_every_tensor_bearing_field(build: Callable[[], onnx.ModelProto]) -> None:
    with pytest.raises(ModelRejected, match="external file") as err:
        check_model_bytes(build().SerializeToString())
    assert err.value.reason == "model_external_data"


def test_a_self_contained_model_with_sparse_and_nested_tensors_passes() -> None:
    values = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    model = _model([helper.make_node("Constant", [], ["y"],
                                     sparse_value=helper.make_sparse_tensor(values, indices, [4]))])
    model.ir_version = 8
    assert check_model_bytes(model.SerializeToString()).graph.node[0].op_type == "Constant"
