"""Activations the builder lacks, as the arithmetic they stand for; inference Dropout as Identity."""
from __future__ import annotations

from onnx import TensorProto, helper

from ...graph import attribute
from . import Rewriter, _op, rewrite

@rewrite("Dropout")
def _dropout(rw: Rewriter, node):
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


def _hard_sigmoid_nodes(rw, node, x, alpha, beta, out):
    m, scaled = _op(rw, node, "Mul", [x, rw.const(node, "alpha", alpha, rw.dtype_of(x))], "scaled")
    a, shifted = _op(rw, node, "Add", [scaled, rw.const(node, "beta", beta, rw.dtype_of(x))], "shifted")
    lo, low_clipped = _op(rw, node, "Max", [shifted, rw.const(node, "zero", 0, rw.dtype_of(x))], "low_clipped")
    hi, _ = _op(rw, node, "Min", [low_clipped, rw.const(node, "one", 1, rw.dtype_of(x))], "", outputs=[out])
    return [m, a, lo, hi]


@rewrite("HardSigmoid")
def _hard_sigmoid(rw: Rewriter, node):
    return _hard_sigmoid_nodes(rw, node, node.input[0], attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5),
                               node.output[0])


@rewrite("HardSwish")
def _hard_swish(rw: Rewriter, node):
    gate = rw.name(node, "gate")
    nodes = _hard_sigmoid_nodes(rw, node, node.input[0], 1.0 / 6.0, 0.5, gate)
    mul, _ = _op(rw, node, "Mul", [node.input[0], gate], "", outputs=[node.output[0]])
    return nodes + [mul]


@rewrite("PRelu")
def _prelu(rw: Rewriter, node):
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


@rewrite("Elu")
def _elu(rw: Rewriter, node):
    return _elu_nodes(rw, node, node.input[0], attribute(node, "alpha", 1.0), node.output[0])


@rewrite("Selu")
def _selu(rw: Rewriter, node):
    elu = rw.name(node, "elu")
    nodes = _elu_nodes(rw, node, node.input[0], attribute(node, "alpha", 1.67326319217681884765625), elu)
    gamma = rw.const(node, "gamma", attribute(node, "gamma", 1.05070102214813232421875), rw.dtype_of(node.input[0]))
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


@rewrite("Softplus")
def _softplus(rw: Rewriter, node):
    return _softplus_nodes(rw, node, node.input[0], node.output[0])


@rewrite("Mish")
def _mish(rw: Rewriter, node):
    softplus = rw.name(node, "softplus")
    nodes = _softplus_nodes(rw, node, node.input[0], softplus)
    t, tanh = _op(rw, node, "Tanh", [softplus], "tanh")
    mul, _ = _op(rw, node, "Mul", [node.input[0], tanh], "", outputs=[node.output[0]])
    return nodes + [t, mul]
