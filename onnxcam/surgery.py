"""Graph edits on ONNX protos: find the logits, add the target-score head, expose tensors as outputs.

The score head makes one backward pass serve a whole batch with any mix of targets: the graph gets
an input ``onnxcam_target_weights`` W (same shape as the logits z) and computes
``score = ReduceSum(z * W_eff)``. A row of W that is all zero means "explain the arg-max class": the
head puts the one-hot of ArgMax(z) there, inside the same run, so the default target costs no extra
pass. ArgMax/OneHot carry no gradient, so d score / d A is exactly d z[n, c_n] / d A per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import OnnxcamError
from .gradients import build_gradient_model, gradient_name
from .model import LoadedModel, default_opset
from .opsets import axes_node

TARGET_WEIGHTS = "onnxcam_target_weights"
SCORE = "onnxcam_score"
BACKEND_KEY = "onnxcam.grad_backend"
_PASS_THROUGH = ("Identity", "Dropout")


@dataclass
class AugmentedModel:
    """A model that returns logits, activations and (when built with gradients) their gradients."""
    proto: onnx.ModelProto
    input_name: str
    logits: str
    activations: list[str]
    gradients: list[str]
    backend: str | None

    @property
    def output_names(self) -> list[str]:
        return [self.logits, *self.activations, *self.gradients]

    @classmethod
    def from_gradient_proto(cls, proto: onnx.ModelProto, input_name: str, logits: str,
                            activations: list[str]) -> "AugmentedModel":
        """Describe a gradient model read back from disk (the backend is recorded in its metadata)."""
        backend = next((p.value for p in proto.metadata_props if p.key == BACKEND_KEY), None)
        return cls(proto, input_name, logits, list(activations), [gradient_name(a) for a in activations],
                   backend)


def copy_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)
    return clone


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Map each tensor name to the node that writes it."""
    return {out: node for node in graph.node for out in node.output if out}


def find_logits(proto: onnx.ModelProto, probabilities: bool = False) -> str:
    """The tensor to score: the first output, or the input of a trailing Softmax (the logits)."""
    graph = proto.graph
    name = graph.output[0].name
    if probabilities:
        return name
    made_by = producers(graph)
    current = _before_passes(made_by, name)
    node = made_by.get(current)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return _before_passes(made_by, node.input[0])
    return name if current == name or node is None else current


def _before_passes(made_by: dict, name: str) -> str:
    """Walk up through Identity/Dropout and quantize-dequantize pairs: a quantized model's output
    QDQ pair only rounds the scores (and would clamp the top logit, whose gradient is then zero)."""
    current = name
    while current in made_by:
        node = made_by[current]
        if node.op_type in _PASS_THROUGH:
            current = node.input[0]
        elif (node.op_type == "DequantizeLinear" and node.input[0] in made_by
              and made_by[node.input[0]].op_type == "QuantizeLinear"):
            current = made_by[node.input[0]].input[0]
        else:
            break
    return current


def _dims(value_info: onnx.ValueInfoProto | None) -> tuple | None:
    if value_info is None or not value_info.type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim)


def tensor_shape(proto: onnx.ModelProto, tensor: str) -> tuple | None:
    """Shape of a tensor from the graph's value infos or shape inference (None dims when symbolic)."""
    declared = {vi.name: vi for vi in list(proto.graph.output) + list(proto.graph.value_info)}
    shape = _dims(declared.get(tensor))
    return shape if shape is not None else _dims(_inferred_value_infos(proto).get(tensor))


def tensor_elem_type(proto: onnx.ModelProto, tensor: str) -> int:
    """Element type of a tensor (0 when unknown)."""
    declared = {vi.name: vi for vi in list(proto.graph.output) + list(proto.graph.value_info)
                + list(proto.graph.input)}
    vi = declared.get(tensor) or _inferred_value_infos(proto).get(tensor)
    return vi.type.tensor_type.elem_type if vi is not None else 0


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _reduce_sum(graph, opset, data, out, axes, keepdims):
    """ReduceSum over ``axes`` (all axes when None)."""
    if axes is None:
        graph.node.append(helper.make_node("ReduceSum", [data], [out], keepdims=keepdims))
    else:
        graph.node.append(axes_node("ReduceSum", data, out, axes, opset,
                                    lambda value: _const(graph, out + "/axes", value), keepdims=keepdims))


def add_target_head(proto: onnx.ModelProto, logits: str) -> str:
    """Add input W and the scalar score tensor (in place); return the score's name."""
    graph = proto.graph
    opset = default_opset(proto)
    shape = tensor_shape(proto, logits)
    rank = len(shape) if shape is not None else 2
    w_dims = ["batch"] + [d if d else f"onnxcam_d{i}" for i, d in enumerate(shape[1:] if shape else [None], 1)]
    graph.input.append(helper.make_tensor_value_info(TARGET_WEIGHTS, TensorProto.FLOAT, w_dims))
    p = "onnxcam_head/"
    if tensor_elem_type(proto, logits) not in (TensorProto.FLOAT, 0):  # float16/double: score in float32
        graph.node.append(helper.make_node("Cast", [logits], [p + "logits_float"], to=TensorProto.FLOAT))
        logits = p + "logits_float"
    weights = TARGET_WEIGHTS
    if rank == 2:  # classifier: zero rows mean arg-max
        if shape is not None and shape[1]:
            depth = _const(graph, p + "depth", np.array([shape[1]], dtype=np.int64))
        else:
            graph.node.append(helper.make_node("Shape", [logits], [p + "shape"]))
            index = _const(graph, p + "class_axis", np.array([1], dtype=np.int64))
            graph.node.append(helper.make_node("Gather", [p + "shape", index], [p + "depth"], axis=0))
            depth = p + "depth"
        on_off = _const(graph, p + "on_off", np.array([0.0, 1.0], dtype=np.float32))
        one = _const(graph, p + "one", np.array(1.0, dtype=np.float32))
        zero = _const(graph, p + "zero", np.array(0.0, dtype=np.float32))
        graph.node.extend([
            helper.make_node("ArgMax", [logits], [p + "argmax"], axis=1, keepdims=0),
            helper.make_node("OneHot", [p + "argmax", depth, on_off], [p + "onehot"], axis=-1),
            helper.make_node("Abs", [TARGET_WEIGHTS], [p + "abs_w"]),
        ])
        _reduce_sum(graph, opset, p + "abs_w", p + "row_sum", [1], 1)
        graph.node.extend([
            helper.make_node("Greater", [p + "row_sum", zero], [p + "has_target_bool"]),
            helper.make_node("Cast", [p + "has_target_bool"], [p + "has_target"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [one, p + "has_target"], [p + "no_target"]),
            helper.make_node("Mul", [p + "onehot", p + "no_target"], [p + "auto_w"]),
            helper.make_node("Add", [TARGET_WEIGHTS, p + "auto_w"], [p + "effective_w"]),
        ])
        weights = p + "effective_w"
    graph.node.append(helper.make_node("Mul", [logits, weights], [p + "weighted"]))
    _reduce_sum(graph, opset, p + "weighted", SCORE, None, 0)
    return SCORE


def set_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Replace the graph outputs by ``names`` (in order, without repeats), keeping known types."""
    known = {vi.name: vi for vi in list(proto.graph.output) + list(proto.graph.value_info)}
    if any(name not in known for name in names):
        known.update(_inferred_value_infos(proto))
    seen = []
    for name in names:
        if name not in seen:
            seen.append(name)
    outputs = []
    for name in seen:
        if name in known and known[name].type.tensor_type.elem_type:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[name])
        else:
            vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        outputs.append(vi)
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)


def _inferred_value_infos(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    return {vi.name: vi for vi in inferred.graph.value_info}


def _check_tensors_exist(proto: onnx.ModelProto, tensors: list[str]) -> None:
    made = set(producers(proto.graph)) | {i.name for i in proto.graph.input}
    missing = [t for t in tensors if t not in made]
    if missing:
        raise OnnxcamError(f"tensor(s) {', '.join(missing)} are not in the graph; "
                           "list valid nodes with `onnxcam nodes MODEL`")


def build_forward_model(model: LoadedModel, activations: list[str],
                        probabilities: bool = False) -> AugmentedModel:
    """Forward-only model exposing the logits and the chosen activations (CAM, EigenCAM, Score-CAM)."""
    _check_tensors_exist(model.proto, activations)
    proto = copy_model(model.proto)
    logits = find_logits(proto, probabilities)
    set_outputs(proto, [logits, *activations])
    return AugmentedModel(proto, model.input.name, logits, list(activations), [], None)


def build_gradient_augmented_model(model: LoadedModel, activations: list[str], backend: str = "auto",
                                   probabilities: bool = False) -> AugmentedModel:
    """The ONE model of DESIGN.md: logits, activations and d score / d activations in one run."""
    _check_tensors_exist(model.proto, activations)
    proto = copy_model(model.proto)
    logits = find_logits(proto, probabilities)
    score = add_target_head(proto, logits)
    set_outputs(proto, [logits, *activations])
    proto, used = build_gradient_model(proto, score, list(activations), backend)
    helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, BACKEND_KEY: used})
    return AugmentedModel(proto, model.input.name, logits, list(activations),
                          [gradient_name(a) for a in activations], used)
