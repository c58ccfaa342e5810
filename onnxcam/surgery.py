"""Graph edits on ONNX protos: find the logits, add the target-score head, expose tensors as outputs.

The score head makes one backward pass serve a whole batch with any mix of targets: the graph gets
an input ``onnxcam_target_weights`` W (same shape as the logits z) and computes
``score = ReduceSum(z * W_eff)``. A row of W that is all zero means "explain the arg-max class": the
head puts the one-hot of ArgMax(z) there, inside the same run, so the default target costs no extra
pass. ArgMax/OneHot carry no gradient, so d score / d A is exactly d z[n, c_n] / d A per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import OnnxcamError, shape_text
from .gradients import build_gradient_model, gradient_name
from .graph import GraphBuilder, GraphView, copy_model, view_of
from .model import LoadedModel
from .runtime import probe_shapes

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


def find_logits(model, probabilities: bool = False, output: str | None = None) -> str:
    """The tensor to score: ``output`` (default the first output), or the input of a Softmax that ends
    it (the logits) unless ``probabilities``."""
    view = view_of(model)
    if output is not None and output not in view.output_names:
        raise OnnxcamError(f"--output {output!r} is not an output of the model; its outputs: "
                           + ", ".join(f"{o} {shape_text(view.shape(o))}" for o in view.output_names))
    name = output or view.output_names[0]
    if probabilities:
        return name
    current = _before_passes(view.producer, name)
    node = view.producer.get(current)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return _before_passes(view.producer, node.input[0])
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


def add_target_head(proto: onnx.ModelProto, logits: str, view: GraphView | None = None) -> str:
    """Add input W and the scalar score tensor (in place); return the score's name."""
    view = view or GraphView(proto)
    graph = proto.graph
    shape = view.static_shape(logits)
    rank = len(shape) if shape is not None else 2
    b = GraphBuilder(view.names(), "onnxcam_head/", view.opset)
    # W takes the logits' own batch dim (symbol or size): shape inference then gives W, the effective
    # weights and logits * W one shape, which lets the backward seed d score / d logits = W directly
    declared = view.shape(logits)
    batch = declared[0] if declared and isinstance(declared[0], (int, str)) and declared[0] else "batch"
    w_dims = [batch] + [d if d else f"onnxcam_d{i}" for i, d in enumerate(shape[1:] if shape else [None], 1)]
    graph.input.append(helper.make_tensor_value_info(b.reserve(TARGET_WEIGHTS), TensorProto.FLOAT, w_dims))
    if view.elem_type(logits) not in (TensorProto.FLOAT, 0):  # float16/double: score in float32
        logits = b.op("Cast", [logits], to=TensorProto.FLOAT)
    weights = TARGET_WEIGHTS
    if rank == 2:  # classifier: zero rows mean arg-max
        if shape is not None and shape[1]:
            depth = b.ints([shape[1]], "depth")
        else:
            depth = b.op("Gather", [b.op("Shape", [logits]), b.ints([1], "class_axis")], axis=0)
        onehot = b.op("OneHot", [b.op("ArgMax", [logits], axis=1, keepdims=0), depth,
                                 b.initializer(np.array([0.0, 1.0], np.float32), "on_off")], axis=-1)
        row_sum = b.axes_op("ReduceSum", b.op("Abs", [TARGET_WEIGHTS]), [1], keepdims=1)
        has_target = b.op("Cast", [b.op("Greater", [row_sum, b.initializer(np.array(0.0, np.float32), "zero")])],
                          to=TensorProto.FLOAT)
        no_target = b.op("Sub", [b.initializer(np.array(1.0, np.float32), "one"), has_target])
        weights = b.op("Add", [TARGET_WEIGHTS, b.op("Mul", [onehot, no_target])])
    weighted = b.op("Mul", [logits, weights])
    b.nodes.append(helper.make_node("ReduceSum", [weighted], [b.reserve(SCORE)], keepdims=0,
                                    name=b.fresh("score")))
    b.apply_to(proto)
    return SCORE


def set_outputs(proto: onnx.ModelProto, names: list[str], view: GraphView | None = None) -> None:
    """Replace the graph outputs by ``names`` (in order, without repeats), keeping known types."""
    view = view or GraphView(proto)
    outputs = []
    for name in dict.fromkeys(names):
        known = view.value_infos.get(name)
        if known is not None and known.type.tensor_type.elem_type:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known)
        else:
            vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        outputs.append(vi)
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)


def _check_tensors_exist(view: GraphView, tensors: list[str]) -> None:
    made = set(view.producer) | {i.name for i in view.graph.input}
    missing = [t for t in tensors if t not in made]
    if missing:
        raise OnnxcamError(f"tensor(s) {', '.join(missing)} are not in the graph; "
                           "list valid nodes with `onnxcam nodes MODEL`")


def specialise_shapes(model: LoadedModel, feeds: dict[str, np.ndarray]) -> LoadedModel:
    """The model with every input fixed to the shape of its feed and every tensor's type and shape
    written into the graph, measured by one run on ``feeds``.

    Exporters such as tf2onnx and paddle2onnx compute shapes at run time (Shape -> Gather -> Concat ->
    Reshape) and leave shape inference blind; a gradient builder needs ranks and sizes. With the
    shapes of this batch written in, every Shape-derived subgraph folds to a constant (graph.py) and
    the backward graph is built for exactly this input shape."""
    proto = copy_model(model.proto)
    graph = proto.graph
    for vi in graph.input:
        if vi.name in feeds:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for size in feeds[vi.name].shape:
                dims.add().dim_value = int(size)
    tensors = [o for node in graph.node for o in node.output if o]
    measured = probe_shapes(proto, tensors, None, feeds)
    outputs = {vi.name for vi in graph.output}
    del graph.value_info[:]
    for name, (elem_type, shape) in measured.items():
        if elem_type and name not in outputs:
            graph.value_info.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
    for vi in graph.output:
        if vi.name in measured:
            elem_type, shape = measured[vi.name]
            vi.type.tensor_type.elem_type = vi.type.tensor_type.elem_type or elem_type or TensorProto.FLOAT
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for size in shape:
                dims.add().dim_value = int(size)
    return replace(model, proto=proto)


def build_forward_model(model: LoadedModel, activations: list[str], probabilities: bool = False,
                        output: str | None = None) -> AugmentedModel:
    """Forward-only model exposing the logits and the chosen activations (CAM, EigenCAM, Score-CAM)."""
    _check_tensors_exist(model.view, activations)
    proto = copy_model(model.proto)
    logits = find_logits(model.view, probabilities, output)
    set_outputs(proto, [logits, *activations], model.view)
    return AugmentedModel(proto, model.input.name, logits, list(activations), [], None)


def build_gradient_augmented_model(model: LoadedModel, activations: list[str], backend: str = "auto",
                                   probabilities: bool = False, output: str | None = None) -> AugmentedModel:
    """The one augmented model: logits, activations and d score / d activations in one run."""
    _check_tensors_exist(model.view, activations)
    proto = copy_model(model.proto)
    logits = find_logits(model.view, probabilities, output)
    score = add_target_head(proto, logits, model.view)
    set_outputs(proto, [logits, *activations], model.view)
    proto, used = build_gradient_model(proto, score, list(activations), backend)
    helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, BACKEND_KEY: used})
    return AugmentedModel(proto, model.input.name, logits, list(activations),
                          [gradient_name(a) for a in activations], used)
