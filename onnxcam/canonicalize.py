"""Rewrite ops that onnxruntime-training's gradient builder cannot differentiate into equivalent ones.

ONNX Runtime 1.19.2's GradientGraphBuilder has no gradient for inference BatchNormalization, Dropout
without a mask, HardSigmoid/HardSwish, PRelu, Elu, Selu, Softplus, Mish, Sum, Mean, GlobalMaxPool,
ReduceMax/ReduceMin and InstanceNormalization; its Split gradient is wrong when one part carries no
gradient; it fails on LayerNormalization without its optional outputs or sharing its weights with another
node, and on a node that reads the same tensor twice (Concat(a, a), Where(c, a, a)); its Resize gradient
has no CPU kernel. Each rewrite below
computes the same function (outputs equal to float rounding) with ops the builder does differentiate.

Only the top-level graph is rewritten. Nothing here imports onnxruntime.
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .opsets import axes_node

PREFIX = "onnxcam_canon/"
_INT64_MAX = np.iinfo(np.int64).max


def canonicalize_for_gradients(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a new model whose top-level graph uses only ops the ORT gradient builder handles."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    rewriter = _Rewriter(result)
    new_nodes: list[onnx.NodeProto] = []
    for original in result.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # detached from the graph that is rebuilt below
        rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        replacement = rule(rewriter, node) if rule else None
        new_nodes.extend([node] if replacement is None else replacement)
    new_nodes = _copy_repeated_inputs(rewriter, new_nodes)
    del result.graph.node[:]
    result.graph.node.extend(new_nodes)
    result.graph.initializer.extend(rewriter.new_initializers)
    _drop_unused_initializers(result.graph)
    return result


class _Rewriter:
    """What the rules need to know about the graph, and a factory for unique names and constants."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.new_initializers: list[onnx.TensorProto] = []
        self.names = _all_names(graph)
        self.counter = itertools.count()
        graph_inputs = {i.name for i in graph.input}
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer
                          if t.name not in graph_inputs}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
                attr = node.attribute[0]
                if attr.name == "value":
                    self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.readers = Counter(name for node in graph.node for name in set(node.input))
        self.consumed = set(self.readers) | {o.name for o in graph.output}
        self.shapes = _inferred_shapes(model)

    def name(self, node: onnx.NodeProto, what: str) -> str:
        base = f"{PREFIX}{node.name or node.output[0]}/{what}"
        name = base
        while name in self.names:
            name = f"{base}_{next(self.counter)}"
        self.names.add(name)
        return name

    def const(self, node: onnx.NodeProto, what: str, value, dtype=None) -> str:
        name = self.name(node, what)
        self.new_initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def shape(self, name: str) -> list | None:
        """Dims (int, or None when unknown) of a tensor, or None when even the rank is unknown."""
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def dtype_of(self, name: str):
        return self.shapes.get(("dtype", name), np.float32)

    def used(self, name: str) -> bool:
        return bool(name) and name in self.consumed


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        if node.name:
            names.add(node.name)
    return names


def _inferred_shapes(model: onnx.ModelProto) -> dict:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    graph = inferred.graph
    shapes: dict = {}
    for info in itertools.chain(graph.input, graph.value_info, graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            shapes[("dtype", info.name)] = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None
                                 for d in tensor_type.shape.dim]
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
        shapes[("dtype", tensor.name)] = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return shapes


# ---- opset-aware builders for ops whose axes moved from attribute to input ---------------------

def _axes_op(rw: _Rewriter, node, op: str, data: str, out: str, axes, **attrs):
    return axes_node(op, data, out, axes, rw.opset,
                     lambda value: rw.const(node, f"{op}_axes", value, np.int64), name=rw.name(node, op), **attrs)


def _reduce_mean(rw, node, data, out, axes):
    return _axes_op(rw, node, "ReduceMean", data, out, axes, keepdims=1)


def _squeeze(rw, node, data, out, axes):
    return _axes_op(rw, node, "Squeeze", data, out, axes)


def _op(rw: _Rewriter, node, op: str, inputs: list[str], what: str, outputs=None, **attrs):
    """A new node named after ``node``; returns (node, its first output)."""
    outs = outputs or [rw.name(node, what)]
    return helper.make_node(op, inputs, outs, name=rw.name(node, op), **attrs), outs[0]


def _attr(node, name, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _channel_shape_for(rw: _Rewriter, node, data: str, values: str, nodes: list) -> str | None:
    """Reshape per-channel ``values`` (C,) to broadcast against ``data`` (N, C, *S)."""
    rank = rw.rank(data)
    if rank is not None:
        target = rw.const(node, "channel_shape", [-1] + [1] * max(rank - 2, 0), np.int64)
    else:  # rank known only at run time: [-1, 1, ..., 1] built from Shape(Shape(data))
        n, shape = _op(rw, node, "Shape", [data], "shape")
        m, rank_t = _op(rw, node, "Shape", [shape], "rank")
        s, spatial = _op(rw, node, "Sub", [rank_t, rw.const(node, "two", [2], np.int64)], "spatial_rank")
        o, ones = _op(rw, node, "ConstantOfShape", [spatial], "ones",
                      value=numpy_helper.from_array(np.array([1], np.int64)))
        c, target = _op(rw, node, "Concat", [rw.const(node, "minus_one", [-1], np.int64), ones],
                        "channel_shape", axis=0)
        nodes += [n, m, s, o, c]
    r, reshaped = _op(rw, node, "Reshape", [values, target], "per_channel")
    nodes.append(r)
    return reshaped


# ---- rules: each returns the replacement nodes, or None to keep the node -------------------------

def _batch_norm(rw: _Rewriter, node):
    if any(rw.used(o) for o in node.output[1:]) or _attr(node, "training_mode", 0):
        return None
    x, gamma, beta, mean, var = node.input[:5]
    eps = _attr(node, "epsilon", 1e-5)
    params = [rw.constant(t) for t in (gamma, beta, mean, var)]
    nodes: list = []
    if all(p is not None for p in params):
        g, b, mu, v = (p.astype(np.float64) for p in params)
        dtype = params[0].dtype
        scale_values = g / np.sqrt(v + eps)
        shift_values = b - mu * scale_values
        rank = rw.rank(x)
        if rank is not None:
            channel = [-1] + [1] * max(rank - 2, 0)
            scale = rw.const(node, "scale", scale_values.reshape(channel), dtype)
            shift = rw.const(node, "shift", shift_values.reshape(channel), dtype)
        else:
            scale = _channel_shape_for(rw, node, x, rw.const(node, "scale_c", scale_values, dtype), nodes)
            shift = _channel_shape_for(rw, node, x, rw.const(node, "shift_c", shift_values, dtype), nodes)
    else:  # parameters computed in the graph: the same arithmetic as ops
        eps_t = rw.const(node, "epsilon", eps, rw.dtype_of(var))
        a, var_eps = _op(rw, node, "Add", [var, eps_t], "var_eps")
        s, std = _op(rw, node, "Sqrt", [var_eps], "std")
        d, scale_c = _op(rw, node, "Div", [gamma, std], "scale_c")
        m, mean_scaled = _op(rw, node, "Mul", [mean, scale_c], "mean_scaled")
        b, shift_c = _op(rw, node, "Sub", [beta, mean_scaled], "shift_c")
        nodes += [a, s, d, m, b]
        scale = _channel_shape_for(rw, node, x, scale_c, nodes)
        shift = _channel_shape_for(rw, node, x, shift_c, nodes)
    mul, scaled = _op(rw, node, "Mul", [x, scale], "scaled")
    add, _ = _op(rw, node, "Add", [scaled, shift], "", outputs=[node.output[0]])
    return nodes + [mul, add]


def _dropout(rw: _Rewriter, node):
    ratio_or_mode = node.input[2] if len(node.input) > 2 else ""
    if ratio_or_mode and (rw.constant(ratio_or_mode) is None or bool(rw.constant(ratio_or_mode))):
        return None  # training mode on (or unknown): Dropout is random there, leave it alone
    nodes = [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=rw.name(node, "Identity"))]
    if len(node.output) > 1 and rw.used(node.output[1]):
        shape, shape_out = _op(rw, node, "Shape", [node.input[0]], "shape")
        mask = helper.make_node("ConstantOfShape", [shape_out], [node.output[1]], name=rw.name(node, "mask"),
                                value=helper.make_tensor("true", TensorProto.BOOL, [1], [True]))
        nodes += [shape, mask]
    return nodes


def _layer_norm(rw: _Rewriter, node):
    """Give LayerNormalization its optional Mean and InvStdDev outputs, which the builder's gradient
    reads, and its own copy of a scale or bias shared with other nodes: the gradient always emits
    ``<scale>_grad`` and ``<bias>_grad``, so two LayerNorms sharing weights would define them twice."""
    copies = []
    inputs = list(node.input)
    for i in (1, 2):
        if i < len(inputs) and inputs[i] and rw.readers[inputs[i]] > 1:
            copy, inputs[i] = _op(rw, node, "Identity", [inputs[i]], "scale_copy" if i == 1 else "bias_copy")
            copies.append(copy)
    if not copies and len(node.output) == 3 and all(node.output):
        return None
    outputs = list(node.output) + [""] * (3 - len(node.output))
    outputs[1] = outputs[1] or rw.name(node, "mean")
    outputs[2] = outputs[2] or rw.name(node, "inv_std_dev")
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.output[:]
    copy.output.extend(outputs)
    del copy.input[:]
    copy.input.extend(inputs)
    return copies + [copy]


def _split(rw: _Rewriter, node):
    """Split -> one Slice per output: the builder's Split gradient breaks when a part gets no gradient."""
    axis = _attr(node, "axis", 0)
    sizes = _attr(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        sizes = rw.constant(node.input[1])
        if sizes is None:
            return None
    count = len(node.output)
    nodes: list = []
    if sizes is None:
        shape = rw.shape(node.input[0])
        dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if dim is not None:
            chunk = -(-dim // count)
            sizes = [min(chunk, dim - i * chunk) for i in range(count)]
    axes = rw.const(node, "axis", [axis], np.int64)
    if sizes is not None:
        offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
        bounds = [(rw.const(node, f"start{i}", [offsets[i]], np.int64),
                   rw.const(node, f"end{i}", [offsets[i + 1]], np.int64)) for i in range(count)]
    else:  # dimension known only at run time: chunk = ceil(dim / count), last part takes the rest
        s, shape_t = _op(rw, node, "Shape", [node.input[0]], "shape")
        g, dim_t = _op(rw, node, "Gather", [shape_t, axes], "dim", axis=0)
        a, dim_plus = _op(rw, node, "Add", [dim_t, rw.const(node, "count_minus_one", [count - 1], np.int64)],
                          "dim_plus")
        d, chunk_t = _op(rw, node, "Div", [dim_plus, rw.const(node, "count", [count], np.int64)], "chunk")
        nodes += [s, g, a, d]
        bounds = []
        for i in range(count):
            m, start = _op(rw, node, "Mul", [chunk_t, rw.const(node, f"index{i}", [i], np.int64)], f"start{i}")
            nodes.append(m)
            if i == count - 1:
                end = rw.const(node, "end_last", [_INT64_MAX], np.int64)
            else:
                m2, end = _op(rw, node, "Mul", [chunk_t, rw.const(node, f"index{i + 1}", [i + 1], np.int64)],
                              f"end{i}")
                nodes.append(m2)
            bounds.append((start, end))
    for i, out in enumerate(node.output):
        if rw.used(out):
            nodes.append(helper.make_node("Slice", [node.input[0], bounds[i][0], bounds[i][1], axes], [out],
                                          name=rw.name(node, f"Slice{i}")))
    return nodes


def _hard_sigmoid_nodes(rw, node, x, alpha, beta, out):
    m, scaled = _op(rw, node, "Mul", [x, rw.const(node, "alpha", alpha, rw.dtype_of(x))], "scaled")
    a, shifted = _op(rw, node, "Add", [scaled, rw.const(node, "beta", beta, rw.dtype_of(x))], "shifted")
    lo, low_clipped = _op(rw, node, "Max", [shifted, rw.const(node, "zero", 0, rw.dtype_of(x))], "low_clipped")
    hi, _ = _op(rw, node, "Min", [low_clipped, rw.const(node, "one", 1, rw.dtype_of(x))], "", outputs=[out])
    return [m, a, lo, hi]


def _hard_sigmoid(rw: _Rewriter, node):
    return _hard_sigmoid_nodes(rw, node, node.input[0], _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5),
                               node.output[0])


def _hard_swish(rw: _Rewriter, node):
    gate = rw.name(node, "gate")
    nodes = _hard_sigmoid_nodes(rw, node, node.input[0], 1.0 / 6.0, 0.5, gate)
    mul, _ = _op(rw, node, "Mul", [node.input[0], gate], "", outputs=[node.output[0]])
    return nodes + [mul]


def _prelu(rw: _Rewriter, node):
    x, slope = node.input[:2]
    ltz, negative = _op(rw, node, "Less", [x, rw.const(node, "zero", 0, rw.dtype_of(x))], "negative")
    mul, sloped = _op(rw, node, "Mul", [x, slope], "sloped")
    where, _ = _op(rw, node, "Where", [negative, sloped, x], "", outputs=[node.output[0]])
    return [ltz, mul, where]


def _elu_nodes(rw, node, x, alpha, out):
    """Where(x > 0, x, alpha * (exp(min(x, 0)) - 1)); min keeps exp finite so no 0 * inf in the gradient."""
    dtype = rw.dtype_of(x)
    zero = rw.const(node, "zero", 0, dtype)
    g, positive = _op(rw, node, "Greater", [x, zero], "positive")
    mn, clamped = _op(rw, node, "Min", [x, zero], "clamped")
    e, exp = _op(rw, node, "Exp", [clamped], "exp")
    s, expm1 = _op(rw, node, "Sub", [exp, rw.const(node, "one", 1, dtype)], "expm1")
    m, negative_part = _op(rw, node, "Mul", [expm1, rw.const(node, "alpha", alpha, dtype)], "negative_part")
    w, _ = _op(rw, node, "Where", [positive, x, negative_part], "", outputs=[out])
    return [g, mn, e, s, m, w]


def _elu(rw: _Rewriter, node):
    return _elu_nodes(rw, node, node.input[0], _attr(node, "alpha", 1.0), node.output[0])


def _selu(rw: _Rewriter, node):
    elu = rw.name(node, "elu")
    nodes = _elu_nodes(rw, node, node.input[0], _attr(node, "alpha", 1.67326319217681884765625), elu)
    gamma = rw.const(node, "gamma", _attr(node, "gamma", 1.05070102214813232421875), rw.dtype_of(node.input[0]))
    mul, _ = _op(rw, node, "Mul", [elu, gamma], "", outputs=[node.output[0]])
    return nodes + [mul]


def _softplus_nodes(rw, node, x, out):
    """log(1 + exp(x)), and x itself above 20 (as torch does) so exp never overflows."""
    dtype = rw.dtype_of(x)
    threshold = rw.const(node, "threshold", 20, dtype)
    g, large = _op(rw, node, "Greater", [x, threshold], "large")
    mn, clamped = _op(rw, node, "Min", [x, threshold], "clamped")
    e, exp = _op(rw, node, "Exp", [clamped], "exp")
    a, one_plus = _op(rw, node, "Add", [exp, rw.const(node, "one", 1, dtype)], "one_plus")
    lg, log = _op(rw, node, "Log", [one_plus], "log")
    w, _ = _op(rw, node, "Where", [large, x, log], "", outputs=[out])
    return [g, mn, e, a, lg, w]


def _softplus(rw: _Rewriter, node):
    return _softplus_nodes(rw, node, node.input[0], node.output[0])


def _mish(rw: _Rewriter, node):
    softplus = rw.name(node, "softplus")
    nodes = _softplus_nodes(rw, node, node.input[0], softplus)
    t, tanh = _op(rw, node, "Tanh", [softplus], "tanh")
    mul, _ = _op(rw, node, "Mul", [node.input[0], tanh], "", outputs=[node.output[0]])
    return nodes + [t, mul]


def _add_chain(rw, node, inputs, out):
    if len(inputs) == 1:
        return [helper.make_node("Identity", inputs, [out], name=rw.name(node, "Identity"))]
    nodes, total = [], inputs[0]
    for i, term in enumerate(inputs[1:], start=1):
        last = i == len(inputs) - 1
        add, total = _op(rw, node, "Add", [total, term], f"partial{i}", outputs=[out] if last else None)
        nodes.append(add)
    return nodes


def _sum(rw: _Rewriter, node):
    return _add_chain(rw, node, list(node.input), node.output[0])


def _mean(rw: _Rewriter, node):
    total = rw.name(node, "total")
    nodes = _add_chain(rw, node, list(node.input), total)
    count = rw.const(node, "count", len(node.input), rw.dtype_of(node.input[0]))
    div, _ = _op(rw, node, "Div", [total, count], "", outputs=[node.output[0]])
    return nodes + [div]


def _max_over_axes(rw, node, x, axes, keepdims, out, largest=1):
    """max (or min) over ``axes`` as one TopK(k=1) per axis; the builder differentiates TopK."""
    k = rw.const(node, "k", [1], np.int64)
    nodes, current = [], x
    for i, axis in enumerate(axes):
        last = i == len(axes) - 1 and keepdims
        values = out if last else rw.name(node, f"max_axis{axis}")
        nodes.append(helper.make_node("TopK", [current, k], [values, rw.name(node, f"index_axis{axis}")],
                                      name=rw.name(node, "TopK"), axis=axis, largest=largest))
        current = values
    if not keepdims:
        nodes.append(_squeeze(rw, node, current, out, axes))
    return nodes


def _global_max_pool(rw: _Rewriter, node):
    rank = rw.rank(node.input[0])
    if rank is None or rank < 3:
        return None
    return _max_over_axes(rw, node, node.input[0], list(range(2, rank)), 1, node.output[0])


def _reduce_extreme(largest: int) -> Callable:
    def rule(rw: _Rewriter, node):
        rank = rw.rank(node.input[0])
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = rw.constant(node.input[1])
            if axes is None:
                return None
        if rank is None:
            return None
        if axes is None or len(axes) == 0:
            if _attr(node, "noop_with_empty_axes", 0):
                return [helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                         name=rw.name(node, "Identity"))]
            axes = range(rank)
        axes = sorted({int(a) % rank for a in np.asarray(axes).reshape(-1)})
        return _max_over_axes(rw, node, node.input[0], axes, _attr(node, "keepdims", 1), node.output[0],
                              largest)
    return rule


def _instance_norm(rw: _Rewriter, node):
    x, scale, bias = node.input[:3]
    rank = rw.rank(x)
    if rank is None or rank < 3:
        return None
    eps = _attr(node, "epsilon", 1e-5)
    spatial = list(range(2, rank))
    mean = rw.name(node, "mean")
    variance = rw.name(node, "variance")
    nodes = [_reduce_mean(rw, node, x, mean, spatial)]
    s, centred = _op(rw, node, "Sub", [x, mean], "centred")
    sq, squared = _op(rw, node, "Mul", [centred, centred], "squared")
    nodes += [s, sq, _reduce_mean(rw, node, squared, variance, spatial)]
    a, var_eps = _op(rw, node, "Add", [variance, rw.const(node, "epsilon", eps, rw.dtype_of(x))], "var_eps")
    r, std = _op(rw, node, "Sqrt", [var_eps], "std")
    d, normalized = _op(rw, node, "Div", [centred, std], "normalized")
    nodes += [a, r, d]
    scale_r = _channel_shape_for(rw, node, x, scale, nodes)
    bias_r = _channel_shape_for(rw, node, x, bias, nodes)
    m, scaled = _op(rw, node, "Mul", [normalized, scale_r], "scaled")
    add, _ = _op(rw, node, "Add", [scaled, bias_r], "", outputs=[node.output[0]])
    return nodes + [m, add]


def _resize(rw: _Rewriter, node):
    """Resize -> one MatMul per resized axis with its interpolation matrix (static sizes only).

    Every Resize mode is separable, so output = M_k applied along each axis k. M_k is obtained exactly
    from the ONNX reference implementation resizing an identity matrix along one axis.
    """
    x = node.input[0]
    shape = rw.shape(x)
    transform = _attr(node, "coordinate_transformation_mode", b"half_pixel")
    if rw.opset < 11 or shape is None or any(d is None for d in shape[2:]) or transform == b"tf_crop_and_resize":
        return None
    if _attr(node, "keep_aspect_ratio_policy", b"stretch") != b"stretch" or _attr(node, "axes") is not None:
        return None
    rank = len(shape)
    scales = rw.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = rw.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and scales.size == 0:
        scales = None
    if (scales is None) == (sizes is None):
        return None
    if scales is not None and (len(scales) != rank or any(s != 1 for s in scales[:2])):
        return None
    if sizes is not None and (len(sizes) != rank or any(shape[i] is not None and sizes[i] != shape[i]
                                                        for i in range(2))):
        return None
    nodes, current = [], x
    resized_axes = [a for a in range(2, rank)
                    if (scales is not None and scales[a] != 1) or (sizes is not None and sizes[a] != shape[a])]
    if not resized_axes:
        return [helper.make_node("Identity", [x], [node.output[0]], name=rw.name(node, "Identity"))]
    for i, axis in enumerate(resized_axes):
        matrix = _interpolation_matrix(node, shape[axis], None if scales is None else float(scales[axis]),
                                       None if sizes is None else int(sizes[axis]))
        if matrix is None:
            return None
        out = node.output[0] if i == len(resized_axes) - 1 else rw.name(node, f"resized_axis{axis}")
        matrix_t = rw.const(node, f"matrix_axis{axis}", matrix.T, rw.dtype_of(x))  # (in, out)
        if axis == rank - 1:
            n, _ = _op(rw, node, "MatMul", [current, matrix_t], "", outputs=[out])
            nodes.append(n)
        else:  # move the axis last, interpolate, move it back
            perm = [a for a in range(rank) if a != axis] + [axis]
            inverse = list(np.argsort(perm))
            t, moved = _op(rw, node, "Transpose", [current], f"moved_axis{axis}", perm=perm)
            m, interpolated = _op(rw, node, "MatMul", [moved, matrix_t], f"interpolated_axis{axis}")
            b, _ = _op(rw, node, "Transpose", [interpolated], "", outputs=[out], perm=inverse)
            nodes += [t, m, b]
        current = out
    return nodes


def _interpolation_matrix(node, size_in: int, scale: float | None, size_out: int | None) -> np.ndarray | None:
    """(out, in) matrix M with resize(v) = M @ v along one axis, for this node's mode and attributes."""
    from onnx.reference import ReferenceEvaluator
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
             if a.name in ("mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside",
                           "nearest_mode", "antialias")}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    opset = 19 if attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric" else 18
    inputs = ["x", "", "scales" if scale is not None else "", "sizes" if size_out is not None else ""]
    while inputs[-1] == "":
        inputs.pop()
    probe = helper.make_node("Resize", inputs, ["y"], **attrs)
    initializers = []
    if scale is not None:
        initializers.append(numpy_helper.from_array(np.array([1.0, scale], np.float32), "scales"))
    else:
        initializers.append(numpy_helper.from_array(np.array([size_in, size_out], np.int64), "sizes"))
    graph = helper.make_graph([probe], "interpolation", [helper.make_tensor_value_info("x", TensorProto.DOUBLE,
                                                                                      [size_in, size_in])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], initializers)
    try:
        rows = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
                                  ).run(None, {"x": np.eye(size_in)})[0]
    except Exception:
        return None
    return np.asarray(rows).T  # row j of the result is resize(e_j) = column j of M


_RULES: dict[str, Callable] = {
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "LayerNormalization": _layer_norm,
    "Split": _split,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "PRelu": _prelu,
    "Elu": _elu,
    "Selu": _selu,
    "Softplus": _softplus,
    "Mish": _mish,
    "Sum": _sum,
    "Mean": _mean,
    "GlobalMaxPool": _global_max_pool,
    "ReduceMax": _reduce_extreme(1),
    "ReduceMin": _reduce_extreme(0),
    "InstanceNormalization": _instance_norm,
    "Resize": _resize,
}

REWRITTEN_OPS = tuple(_RULES)


def _copy_repeated_inputs(rw: _Rewriter, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """A node reading one tensor twice gets an Identity copy for the second read (builder quirk)."""
    result = []
    for node in nodes:
        seen: set[str] = set()
        for i, name in enumerate(node.input):
            if name and name in seen:
                identity, copy = _op(rw, node, "Identity", [name], f"copy_of_input{i}")
                result.append(identity)
                node.input[i] = copy
            seen.add(name)
        result.append(node)
    return result


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {o.name for o in graph.output} | {i.name for i in graph.input}
    for node in graph.node:
        used.update(node.input)
        used.update(_subgraph_names(node))
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        for sub in list(attr.g.node if attr.HasField("g") else []) + [n for g in attr.graphs for n in g.node]:
            names.update(sub.input)
            names.update(_subgraph_names(sub))
    return names
