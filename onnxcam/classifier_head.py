"""Find the linear classifier that CAM needs: activation → global average pooling → linear layer.

CAM (Zhou et al. 2016) is only defined when the logits are a linear function of the spatial mean of the
activations, z = W · mean_S(A) + b. This module follows the graph from the activation tensor and returns
W and b, or says precisely which op breaks the pattern.

Accepted chain (Identity / Dropout anywhere; Transposes before the pooling are followed so that the
activation's own layout is reported):
  GlobalAveragePool | ReduceMean over every spatial axis (NC... or N...C; axes as attribute or input)
  → any of Flatten, Reshape, Squeeze, Unsqueeze, Transpose that keep batch and channel apart
  → Gemm (transA/transB, alpha, beta) | MatMul (+ Add bias) | Conv with a 1×1… kernel,
with weights stored as initializers or Constant nodes. The pooled tensor is tracked as a list of axis
roles ("N" batch, "C" channels, "1" a singleton) so reshapes can be checked without running the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import OnnxcamError
from .graph import GraphView, attribute, view_of

PASS_THROUGH = {"Identity", "Dropout"}
SHAPE_READERS = {"Shape", "Size"}  # consumers that read only metadata, never the values


@dataclass(frozen=True)
class ClassifierHead:
    weight: np.ndarray        # (K, C) float32: logits = weight @ mean_S(A) + bias
    bias: np.ndarray | None   # (K,) float32
    layout: str               # "channels_first" | "channels_last": where C sits in the activation


class _NotCam(Exception):
    """Internal: the graph leaves the CAM pattern at op ``op``."""

    def __init__(self, op: str, detail: str = ""):
        super().__init__(op)
        self.op, self.detail = op, detail


def _next_node(graph: GraphView, name: str) -> onnx.NodeProto:
    """The one node that reads ``name``'s values (shape readers do not count)."""
    users = [n for n in graph.consumers.get(name, []) if n.op_type not in SHAPE_READERS]
    if not users:
        raise _NotCam("nothing (it is not consumed by any node)")
    if len(users) > 1:
        raise _NotCam(" and ".join(sorted({n.op_type for n in users})), "several nodes")
    return users[0]


def _axes(node: onnx.NodeProto, graph: GraphView) -> list[int] | None:
    """Axes given as attribute (older opsets) or as a constant second input (newer); None if absent."""
    axes = attribute(node, "axes")
    if axes is not None:
        return [int(a) for a in axes]
    if len(node.input) > 1 and node.input[1]:
        value = graph.constant(node.input[1])
        if value is None:
            raise _NotCam(node.op_type, "axes computed at run time")
        return [int(a) for a in np.asarray(value).reshape(-1)]
    return None


def _pooling_roles(node: onnx.NodeProto, graph: GraphView, rank: int | None) -> tuple[list[str], str]:
    """Axis roles of the pooled tensor and the activation's layout."""
    if node.op_type == "GlobalAveragePool":
        spatial = (rank or 4) - 2
        return ["N", "C"] + ["1"] * spatial, "channels_first"
    if node.op_type != "ReduceMean":
        raise _NotCam(node.op_type)
    axes = _axes(node, graph)
    if not axes:
        raise _NotCam(node.op_type, "reduces every axis")
    count = len(axes)
    if rank is None:  # infer the rank from the axes: positive ones start at 1 or 2, negative end at -1 or -2
        if min(axes) >= 0:
            rank = count + 2
            first, last = list(range(2, count + 2)), list(range(1, count + 1))
        else:
            rank = count + 2
            first, last = list(range(-count, 0)), list(range(-count - 1, -1))
        axes_set = sorted(axes)
    else:
        axes_set = sorted(a % rank for a in axes)
        first, last = list(range(2, rank)), list(range(1, rank - 1))
    if axes_set == sorted(first):
        layout, roles = "channels_first", ["N", "C"] + ["1"] * count
    elif axes_set == sorted(last):
        layout, roles = "channels_last", ["N"] + ["1"] * count + ["C"]
    else:
        raise _NotCam(node.op_type, f"axes {axes} are not exactly the spatial axes")
    if not attribute(node, "keepdims", 1):
        roles = ["N", "C"]
    return roles, layout


def _merge(roles: list[str], op: str) -> str:
    kept = [r for r in roles if r != "1"]
    if len(kept) > 1:
        raise _NotCam(op, "merges batch and channel axes")
    return kept[0] if kept else "1"


def _reshape_roles(node: onnx.NodeProto, graph: GraphView, roles: list[str]) -> list[str]:
    big = [r for r in roles if r != "1"]
    shape = graph.constant(node.input[1])
    if shape is None:
        rank = graph.rank(node.output[0])
        if rank is None and graph.shape(node.input[1]):
            rank = graph.shape(node.input[1])[0]  # the shape vector's length is the output rank
        if rank == 2 and len(big) == 2:
            return big
        raise _NotCam("Reshape", "shape computed at run time")
    out = []
    for i, s in enumerate(np.asarray(shape).reshape(-1).tolist()):
        if s == 0:
            out.append(roles[i] if i < len(roles) else "?")
        else:
            out.append("1" if s == 1 else "?")
    unknown = [i for i, r in enumerate(out) if r == "?"]
    copied = [r for r in out if r not in ("1", "?")]
    missing = [r for r in big if r not in copied]
    if len(unknown) != len(missing):
        raise _NotCam("Reshape", "target shape does not keep batch and channels apart")
    for i, r in zip(unknown, missing):
        out[i] = r
    if [r for r in out if r != "1"] != big:
        raise _NotCam("Reshape", "reorders batch and channels")
    return out


def _reshaping_roles(node: onnx.NodeProto, graph: GraphView, roles: list[str]) -> list[str]:
    """Roles after a reshaping op, or _NotCam when the op is not one that keeps the pooled features."""
    op = node.op_type
    if op in PASS_THROUGH:
        return roles
    if op == "Flatten":
        axis = attribute(node, "axis", 1)
        axis = axis + len(roles) if axis < 0 else axis
        return [_merge(roles[:axis], op) if axis else "1", _merge(roles[axis:], op)]
    if op == "Transpose":
        perm = attribute(node, "perm") or list(range(len(roles)))[::-1]
        return [roles[p] for p in perm]
    if op == "Squeeze":
        axes = _axes(node, graph)
        if axes is None:
            return [r for r in roles if r != "1"]
        axes = {a % len(roles) for a in axes}
        if any(roles[a] != "1" for a in axes):
            raise _NotCam(op, "squeezes the batch or channel axis")
        return [r for i, r in enumerate(roles) if i not in axes]
    if op == "Unsqueeze":
        axes = _axes(node, graph) or []
        out_rank = len(roles) + len(axes)
        axes = {a % out_rank for a in axes}
        it = iter(roles)
        return ["1" if i in axes else next(it) for i in range(out_rank)]
    if op == "Reshape":
        return _reshape_roles(node, graph, roles)
    raise _NotCam(op)


def _constant_input(node: onnx.NodeProto, index: int, graph: GraphView) -> np.ndarray:
    value = graph.constant(node.input[index]) if len(node.input) > index and node.input[index] else None
    if value is None:
        raise _NotCam(node.op_type, "weights are not constants")
    return np.asarray(value, dtype=np.float32)


def _bias_vector(value: np.ndarray, classes: int, op: str) -> np.ndarray:
    if value.size == 1:
        return np.full(classes, value.reshape(()), dtype=np.float32)
    if value.size == classes and value.shape[-1] == classes:
        return value.reshape(classes).astype(np.float32)
    raise _NotCam(op, f"bias of shape {value.shape} is not per class")


def _linear(node: onnx.NodeProto, tensor: str, graph: GraphView, roles: list[str]):
    """(weight (K, C), bias (K,) or None) of the classifier ``node`` fed by ``tensor``."""
    op = node.op_type
    big = [r for r in roles if r != "1"]
    if op == "Gemm":
        if node.input[0] != tensor:
            raise _NotCam(op, "features enter as the second operand")
        want = ["C", "N"] if attribute(node, "transA", 0) else ["N", "C"]
        if roles != want:
            raise _NotCam(op, "features are not a (batch, channels) matrix")
        b = _constant_input(node, 1, graph)
        weight = b if attribute(node, "transB", 0) else b.T
        weight = np.float32(attribute(node, "alpha", 1.0)) * weight
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.float32(attribute(node, "beta", 1.0)) * _bias_vector(_constant_input(node, 2, graph),
                                                                       weight.shape[0], op)
        return weight, bias
    if op == "MatMul":
        if node.input[0] != tensor or not roles or roles[-1] != "C" or big[0] != "N":
            raise _NotCam(op, "features are not on the last axis of the left operand")
        b = _constant_input(node, 1, graph)
        if b.ndim != 2:
            raise _NotCam(op, "weights are not a matrix")
        weight, bias = b.T, None
        users = [n for n in graph.consumers.get(node.output[0], []) if n.op_type not in SHAPE_READERS]
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            value = graph.constant(other)
            if value is not None:
                bias = _bias_vector(np.asarray(value, dtype=np.float32), weight.shape[0], "Add")
        return weight, bias
    if op == "Conv":
        if node.input[0] != tensor or roles[:2] != ["N", "C"] or len(roles) < 3:
            raise _NotCam(op, "input is not (N, C, 1, …)")
        w = _constant_input(node, 1, graph)
        if attribute(node, "group", 1) != 1 or any(s != 1 for s in w.shape[2:]) or any(attribute(node, "pads", [])):
            raise _NotCam(op, "not a 1×1 convolution without padding")
        bias = _constant_input(node, 2, graph) if len(node.input) > 2 and node.input[2] else None
        return w.reshape(w.shape[0], w.shape[1]), bias
    raise _NotCam(op)


def _compose(perm: list[int] | None, node: onnx.NodeProto, rank: int | None) -> list[int]:
    step = attribute(node, "perm")
    if step is None:
        if rank is None:
            raise _NotCam("Transpose", "axis order unknown")
        step = list(range(rank))[::-1]
    return [(perm[axis] if perm else axis) for axis in step]


def _activation_layout(perm: list[int], pooled_layout: str) -> str:
    """Layout of the activation itself when Transposes sit between it and the pooling."""
    channel = perm[1] if pooled_layout == "channels_first" else perm[-1]
    if perm[0] != 0:
        raise _NotCam("Transpose", "moves the batch axis")
    if channel == 1:
        return "channels_first"
    if channel == len(perm) - 1:
        return "channels_last"
    raise _NotCam("Transpose", "the channel axis is neither second nor last")


def find_classifier_weights(model, activation: str) -> ClassifierHead:
    """The classifier fed by the global average pooling of ``activation`` (a tensor name)."""
    graph = view_of(model)
    producer = graph.producer.get(activation)
    label = producer.name if producer is not None and producer.name else activation
    path: list[str] = []
    try:
        tensor = activation
        node = _next_node(graph, tensor)
        perm = None  # for each axis of the current tensor, the activation axis it comes from
        while node.op_type in PASS_THROUGH or node.op_type == "Transpose":
            if node.op_type == "Transpose":
                perm = _compose(perm, node, graph.rank(tensor))
            path.append(node.op_type)
            tensor = node.output[0]
            node = _next_node(graph, tensor)
        rank = len(perm) if perm else graph.rank(tensor)
        roles, layout = _pooling_roles(node, graph, rank)
        if perm:
            layout = _activation_layout(perm, layout)
        path.append(node.op_type)
        tensor = node.output[0]
        node = _next_node(graph, tensor)
        while node.op_type not in ("Gemm", "MatMul", "Conv"):
            roles = _reshaping_roles(node, graph, roles)
            path.append(node.op_type)
            tensor = node.output[0]
            node = _next_node(graph, tensor)
        weight, bias = _linear(node, tensor, graph, roles)
    except _NotCam as err:
        route = " → ".join(path + [err.op])
        why = f" ({err.detail})" if err.detail else ""
        raise OnnxcamError(f"CAM needs the node to feed global average pooling and then a linear classifier; "
                           f"node {label!r} feeds {route}{why} instead — use --method gradcam") from None
    channels = (graph.static_shape(activation) or [None, None])
    channels = channels[1] if layout == "channels_first" else channels[-1]
    if channels and weight.shape[1] != channels:
        raise OnnxcamError(f"the classifier after node {label!r} expects {weight.shape[1]} features but the "
                           f"node has {channels} channels — use --method gradcam")
    return ClassifierHead(np.ascontiguousarray(weight, dtype=np.float32),
                          None if bias is None else np.ascontiguousarray(bias, dtype=np.float32), layout)
