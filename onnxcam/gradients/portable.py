"""Portable gradient backend: reverse-mode differentiation that emits standard ONNX ops only.

The backward graph is written at the model's own opset with one vector-Jacobian rule per op
(``rules``), so the augmented model runs on any ONNX Runtime build and execution provider.
Only nodes on a float path from a ``wrt`` tensor to the score are differentiated: integer and bool
tensors (Shape, ArgMax, Equal, ...) and everything that does not depend on ``wrt`` are constants.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxcamError
from ..graph import FLOAT_TYPES, GraphView, copy_model, is_default_domain, subgraph_inputs, without_unused
from . import gradient_name
from .rules import DOMAIN_RULES, INTEGER_RULES, RULES, Emitter, Unsupported

MIN_OPSET = 11
PREFIX = "onnxcam_bw/"


def build(model: onnx.ModelProto, score: str, wrt: list[str]) -> onnx.ModelProto:
    """Return a copy of ``model`` with outputs d score / d t (named ``gradient_name(t)``) appended."""
    out, problems = _differentiate(model, score, list(dict.fromkeys(wrt)), collect=False)
    assert not problems
    return out


def unsupported_ops(model: onnx.ModelProto, score: str, wrt: list[str]) -> list[str]:
    """``"Op (node name): why"`` for every node on the differentiated path that has no exact rule."""
    _, problems = _differentiate(model, score, list(dict.fromkeys(wrt)), collect=True)
    return problems


# ---- analysis ---------------------------------------------------------------------------------

def _inputs(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(subgraph_inputs(node))


# Outputs that depend on their inputs only through comparisons, positions or sizes: their gradient is
# zero by definition, so an integer or bool tensor they write is a constant for the differentiator.
# Any other integer tensor computed from the differentiated path carries the value (QuantizeLinear's
# output, a Cast to int) and must meet a rule that accepts it, else it is "no rule", never a zero.
NO_GRADIENT_OUTPUTS = {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater",
                       "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "NonZero",
                       "EyeLike", "RandomNormalLike", "RandomUniformLike"}
INDEX_OUTPUTS = {"TopK": {1}, "MaxPool": {1}, "Unique": {1, 2, 3}}


def _is_float(view: GraphView, name: str) -> bool:
    elem = view.elem_type(name)
    return elem in FLOAT_TYPES or elem == 0  # unknown type: assume float, the rule decides


def _carries_value(node: onnx.NodeProto, k: int, view: GraphView) -> bool:
    """Whether output ``k`` of ``node`` can carry a gradient from the node's inputs."""
    name = node.output[k]
    if _is_float(view, name) or not is_default_domain(node):
        return True
    if node.op_type in NO_GRADIENT_OUTPUTS or k in INDEX_OUTPUTS.get(node.op_type, ()):
        return False
    return not (node.op_type == "Cast" and view.elem_type(name) == TensorProto.BOOL)


def _active_tensors(view: GraphView, score: str, wrt: list[str]) -> set[str]:
    """Tensors that depend on some wrt tensor and that the score depends on: float tensors, and
    integer tensors that carry the value (quantized activations)."""
    graph = view.graph
    depends = set(wrt)
    for node in graph.node:
        if any(i in depends for i in _inputs(node)):
            depends.update(o for k, o in enumerate(node.output) if o and _carries_value(node, k, view))
    needed = {score}
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            needed.update(_inputs(node))
    return depends & needed


def _node_label(node: onnx.NodeProto) -> str:
    if (node.name or "").startswith("onnxcam_"):   # onnxcam's own score head: blame what it reads
        return "the score taken on the model's scored output"
    op = node.op_type if is_default_domain(node) else f"{node.domain}.{node.op_type}"
    return f"{op} (node {node.name or node.output[0]})"


# ---- differentiation --------------------------------------------------------------------------

def _differentiate(model: onnx.ModelProto, score: str, wrt: list[str], collect: bool):
    view = GraphView(model)
    opset = view.opset
    graph = model.graph
    known = view.names()
    for name in [score] + wrt:
        if name not in known:
            raise OnnxcamError(f"tensor {name!r} is not in the model; list tensors with `onnxcam nodes`")
    active = _active_tensors(view, score, wrt)
    path = [n for n in graph.node
            if any(o in active for o in n.output) and any(i in active for i in _inputs(n))]
    problems: list[str] = []
    if path and opset < MIN_OPSET:
        message = f"model opset {opset} (the portable backend needs opset {MIN_OPSET}+)"
        if collect:
            return None, [message]
        raise OnnxcamError(f"cannot differentiate a {message}; convert the model with "
                           "onnx.version_converter or use --grad-backend ort-training")

    out = copy_model(model)
    emitter = Emitter(view, known, PREFIX)
    forward_nodes = {id(n): i for i, n in enumerate(graph.node)}
    contributions: dict[str, list[str]] = {}

    if score in active or score in wrt:
        seed = emitter.op("ConstantOfShape", [emitter.shape_of(score)],
                          value=numpy_helper.from_array(np.ones(1, emitter.np_dtype(score)), ""))
        contributions[score] = [emitter.mark_ones(seed)]

    def gradient_of(name):
        parts = contributions.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            contributions[name] = [emitter.op("Sum", parts)]
        return contributions[name][0]

    for node in reversed(path):
        gy = [gradient_of(o) if o in active else None for o in node.output]
        if all(g is None for g in gy):
            continue
        need = [bool(i) and i in active for i in node.input]
        try:
            rule = (RULES.get(node.op_type) if is_default_domain(node)
                    else DOMAIN_RULES.get((node.domain, node.op_type)))
            if rule is None:
                raise Unsupported("no gradient rule for this op")
            integers = [t for t in list(node.input) + list(node.output)
                        if t in active and not _is_float(view, t)]
            if integers and node.op_type not in INTEGER_RULES:
                raise Unsupported(f"integer tensor {integers[0]!r} on the differentiated path "
                                  "(no rule for this op on integer tensors)")
            if any(i in active for i in subgraph_inputs(node)):
                raise Unsupported("gradient through subgraphs is not supported")
            if node.op_type == "MaxPool":  # the rule reads the arg-max indices of the forward node
                _ensure_maxpool_indices(out.graph.node[forward_nodes[id(node)]], emitter)
                node = out.graph.node[forward_nodes[id(node)]]
            gx = rule(emitter, node, gy, need)
        except Unsupported as e:
            if (node.name or "").startswith("onnxcam_"):   # never name onnxcam's own tensors to the user
                e = Unsupported("the shape of the scored output is not known before the model runs")
            if not collect:
                raise OnnxcamError(f"portable gradient backend: no exact gradient for {_node_label(node)}: "
                                   f"{e}; use --grad-backend ort-training or pick a node closer to the "
                                   "output") from None
            problems.append(f"{_node_label(node)}: {e}")
            continue
        for name, g, wanted in zip(node.input, gx, need):
            if wanted and g is not None:
                contributions.setdefault(name, []).append(g)

    if collect:
        return None, problems

    g_out = out.graph
    for t in wrt:
        grad = gradient_of(t)
        if grad is None:
            grad = emitter.zeros_like(t)
        emitter.nodes.append(helper.make_node("Identity", [grad], [gradient_name(t)],
                                              name=emitter.fresh("output")))
        elem, shape = view.type_of(t)
        g_out.output.append(helper.make_tensor_value_info(gradient_name(t), elem or TensorProto.FLOAT, shape))
    # the backward nodes the outputs need (a rule that broadcast a compact gradient leaves its Expand unused)
    g_out.node.extend(without_unused(emitter.nodes, {o.name for o in g_out.output}))
    return out, problems


def _ensure_maxpool_indices(node: onnx.NodeProto, emitter: Emitter) -> None:
    """Give a MaxPool node (in the copy) its Indices output; the backward rule scatters through it."""
    if len(node.output) > 1 and node.output[1]:
        return
    name = emitter.fresh("maxpool_indices")
    if len(node.output) > 1:
        node.output[1] = name
    else:
        node.output.append(name)
    emitter.set_type(name, TensorProto.INT64, emitter.shape(node.output[0]))
