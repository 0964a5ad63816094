"""LightGBM and XGBoost models to ONNX, through onnxmltools (the ONNX project's own converters).

:func:`gbm_to_onnx` recognises a model by the module and name of its class (or of a base class), so
nothing here imports lightgbm or xgboost: a pickle that holds one has imported it already, and one
that holds neither costs nothing. Recognised are ``lightgbm.LGBMClassifier``, ``LGBMRegressor`` and
``Booster``; ``xgboost.XGBClassifier``, ``XGBRegressor`` and ``Booster`` (subclasses too, e.g.
``XGBRFClassifier``); and a scikit-learn ``Pipeline`` whose last step is one of the estimators.

What comes out is what :func:`edgefleet.hub.adapters.modelfile.sklearn_to_onnx` makes: one float32
input ``input`` of shape ``[N, n_features]`` and tensors only (no ZipMap): a classifier gives
``label`` int64 ``[N]`` and ``probabilities`` float32 ``[N, K]``, a regressor ``variable`` float32
``[N, 1]``. The trees run in float32 in ONNX Runtime where LightGBM and XGBoost compare in float64,
so a row whose feature sits within float32 rounding of a split threshold can take the other branch.

Errors are :class:`~edgefleet.hub.errors.BadRequest`: onnxmltools missing (the ``hub`` extra
brings it), or the converter refusing the model (its message is passed on).
"""

from __future__ import annotations

from typing import Any

from edgefleet.hub.errors import BadRequest

__all__ = ["gbm_to_onnx", "is_raw_booster"]

_KNOWN = {
    "lightgbm": frozenset({"LGBMClassifier", "LGBMRegressor", "Booster"}),
    "xgboost": frozenset({"XGBClassifier", "XGBRegressor", "Booster"}),
}


def _family(obj: Any) -> str | None:
    """``"lightgbm"``, ``"xgboost"`` or None, from the class hierarchy's module names alone."""
    for klass in type(obj).__mro__:
        root = klass.__module__.partition(".")[0]
        if klass.__name__ in _KNOWN.get(root, ()):
            return root
    return None


def is_raw_booster(obj: Any) -> bool:
    """A LightGBM or XGBoost ``Booster`` itself (not the scikit-learn wrapper): its ``predict``
    speaks its own terms (probabilities for a classifier, a DMatrix for XGBoost), so expected
    outputs for it come from ONNX Runtime, not from calling it."""
    return _family(obj) is not None and type(obj).__name__ == "Booster"


def _pipeline_final(obj: Any) -> Any | None:
    """The last step of a scikit-learn Pipeline, or None if ``obj`` is no Pipeline."""
    if not any(k.__module__.startswith("sklearn.") and k.__name__ == "Pipeline" for k in type(obj).__mro__):
        return None
    steps = getattr(obj, "steps", None)
    return steps[-1][1] if steps else None


def gbm_to_onnx(estimator: Any, n_features: int, columns: dict[str, bool] | None = None) -> bytes | None:
    """ONNX bytes for a fitted LightGBM or XGBoost model (or a Pipeline ending in one); None for
    any other object, which is then someone else's to convert. ``columns`` (name -> is text): a
    Pipeline fitted on a DataFrame with text columns gets one input per column, as
    :func:`edgefleet.hub.adapters.modelfile.sklearn_to_onnx` gives it. Raises BadRequest as the
    module says."""
    family = _family(estimator)
    if family is not None:
        return None if columns else _convert_plain(estimator, family, n_features)
    final = _pipeline_final(estimator)
    if final is not None:
        family = _family(final)
        if family is not None:
            return _convert_pipeline(estimator, final, family, n_features, columns)
    return None


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _message(exc: Exception) -> str:
    return str(exc).strip().rstrip(".") or type(exc).__name__


def _onnxmltools(what: Any) -> Any:
    try:
        import onnxmltools
    except ImportError as exc:
        raise BadRequest(
            f"{_describe(what)} is converted to ONNX with onnxmltools, which is not installed: "
            "pip install 'edgefleet[hub]'"
        ) from exc
    return onnxmltools


def _convert_plain(estimator: Any, family: str, n_features: int) -> bytes:
    onnxmltools = _onnxmltools(estimator)
    from onnxmltools.convert.common.data_types import FloatTensorType

    initial_types = [("input", FloatTensorType([None, n_features]))]
    try:
        if family == "lightgbm":
            onx = onnxmltools.convert_lightgbm(estimator, initial_types=initial_types, zipmap=False)
        else:  # the XGBoost converter never emits ZipMap: label and probabilities are tensors already
            onx = onnxmltools.convert_xgboost(estimator, initial_types=initial_types)
    except Exception as exc:
        raise BadRequest(
            f"onnxmltools cannot convert {_describe(estimator)}: {_message(exc)}. Convert it yourself "
            "and publish the .onnx file"
        ) from exc
    _batch_dim_on_outputs(onx)
    data: bytes = onx.SerializeToString()
    return data


def _convert_pipeline(pipeline: Any, final: Any, family: str, n_features: int,
                      columns: dict[str, bool] | None = None) -> bytes:
    """skl2onnx converts the Pipeline; onnxmltools' converter is registered for the final step's
    class (skl2onnx's own recipe, its example "Convert a pipeline with a LightGBM classifier").
    The registration is process-wide and idempotent: the same class gets the same converter."""
    _onnxmltools(final)
    from skl2onnx import get_latest_tested_opset_version, to_onnx, update_registered_converter
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    if family == "lightgbm":
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm as converter
    else:
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost as converter
    classifier = hasattr(final, "predict_proba")
    options: dict[Any, Any] = {}
    if classifier:
        update_registered_converter(
            type(final), f"EdgefleetGbm{type(final).__name__}", calculate_linear_classifier_output_shapes,
            converter, options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
        )
        options = {id(final): {"zipmap": False}}
    else:
        update_registered_converter(
            type(final), f"EdgefleetGbm{type(final).__name__}", calculate_linear_regressor_output_shapes,
            converter, options={"split": None} if family == "lightgbm" else None,
        )
    try:
        # onnxmltools' tree converters write ai.onnx.ml up to version 3, skl2onnx would ask for 5
        initial: list[tuple[str, Any]] = [("input", FloatTensorType([None, n_features]))]
        if columns:
            initial = [(name, StringTensorType([None, 1]) if text else FloatTensorType([None, 1]))
                       for name, text in columns.items()]
        onx = to_onnx(pipeline, initial_types=initial,
                      options=options or None,
                      target_opset={"": get_latest_tested_opset_version(), "ai.onnx.ml": 3})
    except Exception as exc:
        raise BadRequest(
            f"skl2onnx with onnxmltools cannot convert a Pipeline ending in {_describe(final)}: {_message(exc)}. "
            "Convert it yourself and publish the .onnx file"
        ) from exc
    _batch_dim_on_outputs(onx)
    data: bytes = onx.SerializeToString()
    return data


def _batch_dim_on_outputs(onx: Any) -> None:
    """onnxmltools declares LightGBM's ``label`` as ``[1]`` while it is ``[N]`` at run time (the
    published signature and ONNX Runtime's shape check would both be misled): every output's first
    axis is the batch, so name it ``N`` wherever it was written down as a fixed 1."""
    for out in onx.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "N"
