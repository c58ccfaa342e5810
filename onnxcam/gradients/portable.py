"""Portable gradient backend: reverse-mode differentiation that emits standard ONNX ops only.

The backward graph is written at the model's own opset with one vector-Jacobian rule per op
(``rules``), so the augmented model runs on any ONNX Runtime build and execution provider.
Only nodes on a path from a ``wrt`` tensor to the score are differentiated. Integer and bool tensors
written by comparisons, Shape, ArgMax and the like, and everything that does not depend on ``wrt``, are
constants; an integer tensor that carries the value (QuantizeLinear's output) stays on the path, and
only rules that accept integer tensors (the quantization rules, reshapes) may differentiate it.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxcamError
from . import gradient_name
from .rules import DOMAIN_RULES, INTEGER_RULES, RULES, Emitter, Unsupported
from .rules.base import FLOAT_TYPES

MIN_OPSET = 11
PREFIX = "onnxcam_bw"


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

def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise OnnxcamError("model has no default-domain opset import; it is not a valid ONNX model")


def _dims(type_proto) -> tuple[int, list | None]:
    if not type_proto.HasField("tensor_type"):
        return 0, None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    dims = []
    for d in tt.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return tt.elem_type, dims


def _tensor_types(model: onnx.ModelProto) -> dict:
    model = _standard_qdq(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a help, not a requirement
        inferred = model
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = _dims(vi.type)
    for init in g.initializer:
        types[init.name] = (init.data_type, list(init.dims))
    return types


def _standard_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """For shape inference only: com.microsoft Q/DQ (which onnx cannot infer) read as the standard ops,
    which compute the same shapes and types."""
    contrib = [i for i, n in enumerate(model.graph.node)
               if (n.domain, n.op_type) in DOMAIN_RULES and n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not contrib:
        return model
    copy_ = onnx.ModelProto()
    copy_.CopyFrom(model)
    for i in contrib:
        copy_.graph.node[i].domain = ""
    return copy_


def _constants(graph: onnx.GraphProto, opset: int) -> dict[str, np.ndarray]:
    """Values of constant tensors: initializers, Constant nodes, and small all-constant subgraphs
    (exporters leave pad/slice arithmetic on constants unfolded), evaluated with onnx.reference."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for inp in graph.input:  # an initializer that is also an input can be overridden: not constant
        values.pop(inp.name, None)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant" and node.attribute:
            a = node.attribute[0]
            if a.name == "value":
                values[node.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                values[node.output[0]] = np.array(helper.get_attribute_value(a))
        elif _foldable(node, values):
            folded = _evaluate(node, values, opset)
            if folded is not None:
                values.update(folded)
    return values


FOLD_LIMIT = 4096  # elements: fold shape/pad arithmetic, never weight transforms
NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                "Bernoulli", "If", "Loop", "Scan"}


def _foldable(node: onnx.NodeProto, values: dict) -> bool:
    inputs = [i for i in node.input if i]
    return (bool(inputs) and node.op_type not in NOT_FOLDABLE and all(i in values for i in inputs)
            and all(values[i].size <= FOLD_LIMIT for i in inputs))


def _evaluate(node: onnx.NodeProto, values: dict, opset: int) -> dict | None:
    from onnx.reference import ReferenceEvaluator
    try:
        results = ReferenceEvaluator(node, opsets={"": opset}).run(
            None, {i: values[i] for i in node.input if i})
    except Exception:  # folding is an optimisation for the rules; the node stays as it is
        return None
    out = {}
    for name, value in zip(node.output, results):
        if name and isinstance(value, np.ndarray) and value.size <= FOLD_LIMIT:
            out[name] = value
    return out


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors a node's subgraphs (If/Loop/Scan bodies) read implicitly."""
    names = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            local = {i.name for i in sg.input} | {i.name for i in sg.initializer}
            for n in sg.node:
                names.update(i for i in list(n.input) + list(_subgraph_inputs(n)) if i and i not in local)
                local.update(n.output)
    return names


def _inputs(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_inputs(node))


# Outputs that depend on their inputs only through comparisons, positions or sizes: their gradient is
# zero by definition, so an integer or bool tensor they write is a constant for the differentiator.
# Any other integer tensor computed from the differentiated path carries the value (QuantizeLinear's
# output, a Cast to int) and must meet a rule that accepts it, else it is "no rule", never a zero.
NO_GRADIENT_OUTPUTS = {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater",
                       "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "NonZero",
                       "EyeLike", "RandomNormalLike", "RandomUniformLike"}
INDEX_OUTPUTS = {"TopK": {1}, "MaxPool": {1}, "Unique": {1, 2, 3}}


def _is_float(types: dict, name: str) -> bool:
    elem = types.get(name, (0, None))[0]
    return elem in FLOAT_TYPES or elem == 0  # unknown type: assume float, the rule decides


def _carries_value(node: onnx.NodeProto, k: int, types: dict) -> bool:
    """Whether output ``k`` of ``node`` can carry a gradient from the node's inputs."""
    name = node.output[k]
    if _is_float(types, name):
        return True
    if node.domain not in ("", "ai.onnx"):
        return True
    if node.op_type in NO_GRADIENT_OUTPUTS or k in INDEX_OUTPUTS.get(node.op_type, ()):
        return False
    return not (node.op_type == "Cast" and types.get(name, (0,))[0] == TensorProto.BOOL)


def _active_tensors(graph: onnx.GraphProto, types: dict, score: str, wrt: list[str]) -> set[str]:
    """Tensors that depend on some wrt tensor and that the score depends on: float tensors, and
    integer tensors that carry the value (quantized activations)."""
    depends = set(wrt)
    for node in graph.node:
        if any(i in depends for i in _inputs(node)):
            depends.update(o for k, o in enumerate(node.output) if o and _carries_value(node, k, types))
    needed = {score}
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            needed.update(_inputs(node))
    return depends & needed


def _node_label(node: onnx.NodeProto) -> str:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    return f"{op} (node {node.name or node.output[0]})"


# ---- differentiation --------------------------------------------------------------------------

def _differentiate(model: onnx.ModelProto, score: str, wrt: list[str], collect: bool):
    opset = _opset(model)
    graph = model.graph
    types = _tensor_types(model)
    known = set(types) | {o for n in graph.node for o in n.output}
    for name in [score] + wrt:
        if name not in known:
            raise OnnxcamError(f"tensor {name!r} is not in the model; list tensors with `onnxcam nodes`")
    active = _active_tensors(graph, types, score, wrt)
    path = [n for n in graph.node
            if any(o in active for o in n.output) and any(i in active for i in _inputs(n))]
    problems: list[str] = []
    if path and opset < MIN_OPSET:
        message = f"model opset {opset} (the portable backend needs opset {MIN_OPSET}+)"
        if collect:
            return None, [message]
        raise OnnxcamError(f"cannot differentiate a {message}; convert the model with "
                           "onnx.version_converter or use --grad-backend ort-training")

    out = copy.deepcopy(model)
    taken = known | {n.name for n in graph.node} | {i.name for i in graph.initializer}
    emitter = Emitter(opset, types, _constants(graph, opset), taken, PREFIX)
    forward_nodes = {id(n): i for i, n in enumerate(graph.node)}
    contributions: dict[str, list[str]] = {}

    if score in active or score in wrt:
        seed = emitter.op("ConstantOfShape", [emitter.shape_of(score)],
                          value=numpy_helper.from_array(np.ones(1, emitter.np_dtype(score)), ""))
        contributions[score] = [seed]

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
            rule = (RULES.get(node.op_type) if node.domain in ("", "ai.onnx")
                    else DOMAIN_RULES.get((node.domain, node.op_type)))
            if rule is None:
                raise Unsupported("no gradient rule for this op")
            integers = [t for t in list(node.input) + list(node.output)
                        if t in active and not _is_float(types, t)]
            if integers and node.op_type not in INTEGER_RULES:
                raise Unsupported(f"integer tensor {integers[0]!r} on the differentiated path "
                                  "(no rule for this op on integer tensors)")
            if any(i in active for i in _subgraph_inputs(node)):
                raise Unsupported("gradient through subgraphs is not supported")
            if node.op_type == "MaxPool":  # the rule reads the arg-max indices of the forward node
                _ensure_maxpool_indices(out.graph.node[forward_nodes[id(node)]], emitter)
                node = out.graph.node[forward_nodes[id(node)]]
            gx = rule(emitter, node, gy, need)
        except Unsupported as e:
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
        elem, shape = types.get(t, (TensorProto.FLOAT, None))
        g_out.output.append(helper.make_tensor_value_info(gradient_name(t), elem or TensorProto.FLOAT, shape))
    g_out.node.extend(emitter.nodes)
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
