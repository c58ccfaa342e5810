"""Normalisations in elementary ops: inference BatchNormalization -> Mul/Add, InstanceNormalization
spelled out, LayerNormalization given the optional outputs and private weights the builder needs."""
from __future__ import annotations

import numpy as np
import onnx

from ...graph import attribute
from . import Rewriter, _channel_shape_for, _op, rewrite

@rewrite("BatchNormalization")
def _batch_norm(rw: Rewriter, node):
    if any(rw.used(o) for o in node.output[1:]) or attribute(node, "training_mode", 0):
        return None
    x, gamma, beta, mean, var = node.input[:5]
    eps = attribute(node, "epsilon", 1e-5)
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


@rewrite("LayerNormalization")
def _layer_norm(rw: Rewriter, node):
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


@rewrite("InstanceNormalization")
def _instance_norm(rw: Rewriter, node):
    x, scale, bias = node.input[:3]
    rank = rw.rank(x)
    if rank is None or rank < 3:
        return None
    eps = attribute(node, "epsilon", 1e-5)
    spatial = list(range(2, rank))
    mean = rw.name(node, "mean")
    variance = rw.name(node, "variance")
    nodes = [rw.axes_op(node, "ReduceMean", x, mean, spatial, keepdims=1)]
    s, centred = _op(rw, node, "Sub", [x, mean], "centred")
    sq, squared = _op(rw, node, "Mul", [centred, centred], "squared")
    nodes += [s, sq, rw.axes_op(node, "ReduceMean", squared, variance, spatial, keepdims=1)]
    a, var_eps = _op(rw, node, "Add", [variance, rw.const(node, "epsilon", eps, rw.dtype_of(x))], "var_eps")
    r, std = _op(rw, node, "Sqrt", [var_eps], "std")
    d, normalized = _op(rw, node, "Div", [centred, std], "normalized")
    nodes += [a, r, d]
    scale_r = _channel_shape_for(rw, node, x, scale, nodes)
    bias_r = _channel_shape_for(rw, node, x, bias, nodes)
    m, scaled = _op(rw, node, "Mul", [normalized, scale_r], "scaled")
    add, _ = _op(rw, node, "Add", [scaled, bias_r], "", outputs=[node.output[0]])
    return nodes + [m, add]
