"""Gradient backend built on onnxruntime-training's GradientGraphBuilder.

The builder (``GradientGraphBuilder(model_bytes, y_names, x_names, loss_name, session_options)``, then
``build()`` and ``get_model()``) appends to the forward graph the backward ops from the loss to the
requested ``x`` tensors only: no weight gradients, nothing upstream of the deepest ``x``. It names each
gradient ``<x>_grad`` and adds it to the graph outputs. Its gradient ops (ConvGrad, ReluGrad, Scale ...)
live in the com.microsoft domain, so the result runs only on a training build of ONNX Runtime.
"""
from __future__ import annotations

import re

import onnx
from onnx import helper, version_converter

from .canonical import canonicalize_for_gradients
from ..errors import OnnxcamError
from ..graph import GraphView, default_opset
from . import gradient_name

MAX_OPSET = 21  # highest ai.onnx opset onnxruntime 1.19.2 implements
MIN_OPSET = 13  # gradient rules emit opset-13 forms (LessOrEqual, ReduceSum with an axes input ...)
MAX_IR_VERSION = 10  # highest IR version onnxruntime 1.19.2 loads; IR 10 covers opset 21
_TWO_GIB = 2 ** 31


class BuilderFailure(OnnxcamError):
    """GradientGraphBuilder could not build the gradient: ``reason`` says why (no advice), the message
    adds the advice for a user who chose this backend; ``auto`` writes its own advice instead."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"{reason}; {advice}")
        self.reason = reason


def build(model: onnx.ModelProto, score: str, wrt: list[str]) -> onnx.ModelProto:
    """Model with the original outputs followed by d score / d t for each t in ``wrt``."""
    _check_request(model, score, wrt)
    prepared = canonicalize_for_gradients(_with_supported_opset(model))
    built = _run_builder(prepared, score, wrt)
    return _route_outputs(built, model, wrt)


def _check_request(model: onnx.ModelProto, score: str, wrt: list[str]) -> None:
    graph = model.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    if score not in produced:
        raise OnnxcamError(f"score tensor {score!r} is not computed by the model; add the target head first")
    missing = [t for t in wrt if t not in produced]
    if missing:
        raise OnnxcamError(f"tensor {missing[0]!r} is not in the model; list candidates with `onnxcam nodes`")
    if len(set(wrt)) != len(wrt):
        raise OnnxcamError("the same tensor is requested twice; pass each node once")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise OnnxcamError("the model's external data is not loaded; load it with onnxcam's model loader "
                           "(or onnx.load with load_external_data=True)")
    if model.ByteSize() >= _TWO_GIB:
        raise BuilderFailure("the model is over 2 GiB, more than the ort-training backend can pass to "
                             "ONNX Runtime", "use --grad-backend portable")


def _with_supported_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert the default-domain opset into [MIN_OPSET, MAX_OPSET] when it is outside."""
    opset = default_opset(model)
    if MIN_OPSET <= opset <= MAX_OPSET:
        converted = model
    else:
        target = MAX_OPSET if opset > MAX_OPSET else MIN_OPSET
        try:
            converted = version_converter.convert_version(model, target)
        except Exception as error:
            raise BuilderFailure(
                f"the model uses opset {opset}, which onnxruntime-training 1.19.2 does not run, and it could "
                f"not be converted to opset {target} ({_summary(error)})",
                f"re-export the model with opset {target} or use --grad-backend portable") from None
    if converted.ir_version > MAX_IR_VERSION:
        if converted is model:
            converted = onnx.ModelProto()
            converted.CopyFrom(model)
        converted.ir_version = MAX_IR_VERSION
    return converted


def _run_builder(model: onnx.ModelProto, score: str, wrt: list[str]) -> onnx.ModelProto:
    from onnxruntime import SessionOptions
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    options = SessionOptions()
    options.log_severity_level = 3  # the builder logs every initializer it drops
    try:
        builder = GradientGraphBuilder(model.SerializeToString(), {score}, set(wrt), score, options)
        builder.build()
        built = onnx.load_from_string(builder.get_model())
    except Exception as error:
        raise _explain_builder_failure(str(error), wrt) from None
    produced = {o.name for o in built.graph.output}
    lacking = [t for t in wrt if t + "_grad" not in produced]
    if lacking:
        raise BuilderFailure(f"onnxruntime-training built no gradient for {lacking[0]!r}",
                             "use --grad-backend portable")
    return built


def _explain_builder_failure(message: str, wrt: list[str]) -> OnnxcamError:
    unregistered = re.search(r"has not been registered: (\S+) for node (\S*)", message)
    if unregistered:
        op, node = unregistered.groups()
        where = f" (node {node})" if node else ""
        return BuilderFailure(f"onnxruntime-training cannot differentiate {op}{where} between the score and "
                              "the chosen node", "pick a node after it or use --grad-backend portable")
    unreachable = re.search(r"partial derivative for '([^']+)' as it's unreachable", message)
    if unreachable:
        return OnnxcamError(f"the score does not depend on tensor {unreachable.group(1)!r} (no differentiable "
                            "path to the logits); pick a node that feeds the logits")
    gradient_limit = re.search(r"(\w+) gradient currently supports ([^.]+)", message)
    if gradient_limit:
        op, what = gradient_limit.groups()
        return BuilderFailure(f"onnxruntime-training's {op} gradient supports {what} only",
                              f"pick a node after the {op} or use --grad-backend portable")
    return BuilderFailure(f"onnxruntime-training could not build the gradient of {', '.join(wrt)}: "
                          f"{_summary(message)[-300:]}", "try --grad-backend portable")


def _route_outputs(built: onnx.ModelProto, original: onnx.ModelProto, wrt: list[str]) -> onnx.ModelProto:
    """Outputs = the original outputs, then ``gradient_name(t)`` (an Identity of ``t_grad``) per t."""
    graph = built.graph
    view = GraphView(original)
    gradients = []
    for tensor in wrt:
        name = gradient_name(tensor)
        graph.node.append(helper.make_node("Identity", [tensor + "_grad"], [name],
                                           name=f"onnxcam_grad/{tensor}"))
        gradient = onnx.ValueInfoProto()
        known = view.value_infos.get(tensor)
        if known is not None and known.type.HasField("tensor_type"):
            gradient.type.CopyFrom(known.type)
        else:
            gradient.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        gradient.name = name
        gradients.append(gradient)
    outputs = list(original.graph.output) + gradients
    del graph.output[:]
    graph.output.extend(outputs)
    return built


def _summary(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
