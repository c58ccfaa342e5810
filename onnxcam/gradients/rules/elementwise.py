"""Rules for element-wise ops: arithmetic with numpy broadcasting and the usual activations.

Kinks follow PyTorch's backward: Relu/LeakyRelu/PRelu pass the gradient where x > 0; Clip (ReLU6,
hardtanh) passes it where min < x < max, both ends excluded, as torch's hardtanh/relu6 do (torch.clamp
itself includes the ends; ONNX cannot tell the two apart, and ReLU6 is the case that matters);
HardSigmoid passes it strictly inside its linear part; Max/Min split ties evenly like torch.maximum.
"""
from __future__ import annotations

import math

from . import rule
from .base import FLOAT_TYPES, Emitter, Unsupported, node_attrs


def _unb(e: Emitter, g: str, node, i: int) -> str:
    return e.unbroadcast(g, e.shape(node.output[0]), node.input[i])


def _where(e: Emitter, cond: str, a: str, b: str) -> str:
    return e.op("Where", [cond, a, b])


def _mask(e: Emitter, cond: str, like: str) -> str:
    """A bool condition as 0/1 of the float type of ``like`` (Cast + Mul runs ~3x faster than Where)."""
    return e.op("Cast", [cond], to=e.dtype(like))


@rule("Identity", "Dropout", integer=True)
def identity(e, node, gy, need):
    if node.op_type == "Dropout":
        a = node_attrs(node)
        if len(node.input) > 2 and node.input[2] and e.value(node.input[2]) is None:
            raise Unsupported("training_mode must be a constant")
        if len(node.input) > 2 and node.input[2] and bool(e.value(node.input[2])):
            raise Unsupported("training-mode Dropout is random")
        if a.get("is_test", 1) == 0 and e.opset < 7:
            raise Unsupported("training-mode Dropout is random")
    return [gy[0]] + [None] * (len(node.input) - 1)


@rule("Cast", integer=True)
def cast(e, node, gy, need):
    source, target = e.dtype(node.input[0]), e.dtype(node.output[0])
    if target not in FLOAT_TYPES:
        raise Unsupported("Cast to a non-float type (truncation has no gradient)")
    if source not in FLOAT_TYPES:  # a quantized integer read as float: the value passes unchanged
        return [gy[0]]
    return [e.op("Cast", [gy[0]], to=source)]


@rule("Add", "Sub", "Sum", "Mean")
def additive(e, node, gy, need):
    g = gy[0]
    out = []
    for i in range(len(node.input)):
        if not need[i]:
            out.append(None)
            continue
        gi = g
        if node.op_type == "Sub" and i == 1:
            gi = e.op("Neg", [g])
        if node.op_type == "Mean":
            gi = e.op("Mul", [g, e.scalar(1.0 / len(node.input), node.output[0])])
        out.append(_unb(e, gi, node, i))
    return out


@rule("Mul")
def mul(e, node, gy, need):
    a, b = node.input
    y = node.output[0]

    def times(other: str) -> str:
        if e.same_shape(other, y):      # the product has the full shape whatever gy's broadcast
            # d Σ(a·b) / da = b exactly: the score head's seed is all ones
            return other if e.is_ones(gy[0]) else e.op("Mul", [e.compact(gy[0]), other])
        return e.op("Mul", [gy[0], other])

    return [_unb(e, times(b), node, 0) if need[0] else None,
            _unb(e, times(a), node, 1) if need[1] else None]


@rule("Div")
def div(e, node, gy, need):
    a, b = node.input
    y = node.output[0]
    ga = _unb(e, e.op("Div", [gy[0], b]), node, 0) if need[0] else None
    gb = None
    if need[1]:  # d(a/b)/db = -y/b
        gb = _unb(e, e.op("Neg", [e.op("Div", [e.op("Mul", [gy[0], y]), b])]), node, 1)
    return [ga, gb]


@rule("Neg")
def neg(e, node, gy, need):
    return [e.op("Neg", [gy[0]])]


@rule("Relu")
def relu(e, node, gy, need):
    # y > 0 exactly where x > 0; reading y, not x, leaves ONNX Runtime free to fuse Conv + Relu
    y = node.output[0]
    # the mask has y's full shape: a broadcast gradient (after a global pooling) need not be expanded
    return [e.op("Mul", [e.compact(gy[0]), _mask(e, e.op("Greater", [y, e.scalar(0.0, y)]), y)])]


@rule("LeakyRelu")
def leaky_relu(e, node, gy, need):
    alpha = node_attrs(node).get("alpha", 0.01)
    x = node.output[0] if alpha > 0 else node.input[0]  # same sign as the input when alpha > 0
    positive = _mask(e, e.op("Greater", [x, e.scalar(0.0, x)]), x)
    slope = e.op("Add", [e.op("Mul", [positive, e.scalar(1.0 - alpha, x)]), e.scalar(alpha, x)])
    return [e.op("Mul", [gy[0], slope])]


@rule("PRelu")
def prelu(e, node, gy, need):
    x, slope = node.input
    positive = e.op("Greater", [x, e.scalar(0.0, x)])
    zero = e.scalar(0.0, x)
    gx = _where(e, positive, gy[0], e.op("Mul", [gy[0], slope])) if need[0] else None
    gs = None
    if need[1]:
        gs = _unb(e, _where(e, positive, zero, e.op("Mul", [gy[0], x])), node, 1)
    return [gx, gs]


def _clip_bounds(e, node):
    a = node_attrs(node)
    if e.opset < 11:
        return a.get("min"), a.get("max")
    bounds = []
    for k in (1, 2):
        name = node.input[k] if len(node.input) > k else ""
        bounds.append(name or None)
    return bounds


@rule("Clip")
def clip(e, node, gy, need):
    if any(need[1:]):
        raise Unsupported("gradient with respect to the clip bounds")
    # min < y < max exactly where min < x < max (y is clamped to the bound elsewhere); reading the
    # output leaves ONNX Runtime free to fuse Conv + Clip
    x = node.output[0]
    low, high = _clip_bounds(e, node)
    inside = None
    for bound, op_type in ((low, "Greater"), (high, "Less")):
        if bound is None:
            continue
        bound = e.scalar(bound, x) if isinstance(bound, float) else bound
        test = e.op(op_type, [x, bound])
        inside = test if inside is None else e.op("And", [inside, test])
    g = gy[0] if inside is None else e.op("Mul", [e.compact(gy[0]), _mask(e, inside, x)])   # full-shape mask
    return [g] + [None] * (len(node.input) - 1)


@rule("Sigmoid")
def sigmoid(e, node, gy, need):
    y = node.output[0]
    return [e.op("Mul", [gy[0], e.op("Mul", [y, e.op("Sub", [e.scalar(1.0, y), y])])])]


@rule("HardSigmoid")
def hard_sigmoid(e, node, gy, need):
    a = node_attrs(node)
    x = t = node.output[0]  # 0 < y < 1 exactly inside the linear part
    inside = e.op("And", [e.op("Greater", [t, e.scalar(0.0, x)]), e.op("Less", [t, e.scalar(1.0, x)])])
    return [e.op("Mul", [e.op("Mul", [gy[0], e.scalar(a.get("alpha", 0.2), x)]), _mask(e, inside, x)])]


@rule("HardSwish")
def hard_swish(e, node, gy, need):
    # torch: 0 for x < -3, x/3 + 1/2 for -3 <= x <= 3, 1 above
    x = node.input[0]
    middle = e.op("Add", [e.op("Mul", [x, e.scalar(1.0 / 3.0, x)]), e.scalar(0.5, x)])
    above = _mask(e, e.op("Greater", [x, e.scalar(3.0, x)]), x)
    inside = _mask(e, e.op("Not", [e.op("Or", [e.op("Less", [x, e.scalar(-3.0, x)]),
                                               e.op("Greater", [x, e.scalar(3.0, x)])])]), x)
    slope = e.op("Add", [e.op("Mul", [middle, inside]), above])
    return [e.op("Mul", [gy[0], slope])]


@rule("Tanh")
def tanh(e, node, gy, need):
    y = node.output[0]
    return [e.op("Mul", [gy[0], e.op("Sub", [e.scalar(1.0, y), e.op("Mul", [y, y])])])]


@rule("Exp")
def exp(e, node, gy, need):
    return [e.op("Mul", [gy[0], node.output[0]])]


@rule("Log")
def log(e, node, gy, need):
    return [e.op("Div", [gy[0], node.input[0]])]


@rule("Sqrt")
def sqrt(e, node, gy, need):
    y = node.output[0]
    return [e.op("Div", [gy[0], e.op("Mul", [y, e.scalar(2.0, y)])])]


@rule("Reciprocal")
def reciprocal(e, node, gy, need):
    y = node.output[0]
    return [e.op("Neg", [e.op("Mul", [gy[0], e.op("Mul", [y, y])])])]


@rule("Abs")
def abs_(e, node, gy, need):
    return [e.op("Mul", [gy[0], e.op("Sign", [node.input[0]])])]


@rule("Pow")
def pow_(e, node, gy, need):
    if need[1]:
        raise Unsupported("gradient with respect to the exponent")
    x, p = node.input
    if e.dtype(p) != e.dtype(x):
        p = e.op("Cast", [p], to=e.dtype(x))
    dydx = e.op("Mul", [p, e.op("Pow", [x, e.op("Sub", [p, e.scalar(1.0, x)])])])
    return [_unb(e, e.op("Mul", [gy[0], dydx]), node, 0), None]


@rule("Erf")
def erf(e, node, gy, need):
    x = node.input[0]
    bell = e.op("Exp", [e.op("Neg", [e.op("Mul", [x, x])])])
    return [e.op("Mul", [gy[0], e.op("Mul", [bell, e.scalar(2.0 / math.sqrt(math.pi), x)])])]


@rule("Gelu")
def gelu(e, node, gy, need):
    x = node.input[0]
    s = lambda v: e.scalar(v, x)  # noqa: E731
    approximate = node_attrs(node).get("approximate", "none")
    if approximate == "none":  # Phi(x) + x phi(x)
        cdf = e.op("Mul", [s(0.5), e.op("Add", [s(1.0), e.op("Erf", [e.op("Mul", [x, s(1 / math.sqrt(2))])])])])
        pdf = e.op("Mul", [s(1 / math.sqrt(2 * math.pi)),
                           e.op("Exp", [e.op("Mul", [e.op("Mul", [x, x]), s(-0.5)])])])
        slope = e.op("Add", [cdf, e.op("Mul", [x, pdf])])
    elif approximate == "tanh":
        c, k = math.sqrt(2 / math.pi), 0.044715
        x2 = e.op("Mul", [x, x])
        u = e.op("Mul", [s(c), e.op("Mul", [x, e.op("Add", [s(1.0), e.op("Mul", [s(k), x2])])])])
        t = e.op("Tanh", [u])
        du = e.op("Mul", [s(c), e.op("Add", [s(1.0), e.op("Mul", [s(3 * k), x2])])])
        sech2 = e.op("Sub", [s(1.0), e.op("Mul", [t, t])])
        slope = e.op("Add", [e.op("Mul", [s(0.5), e.op("Add", [s(1.0), t])]),
                             e.op("Mul", [e.op("Mul", [s(0.5), x]), e.op("Mul", [sech2, du])])])
    else:
        raise Unsupported(f"approximate={approximate!r}")
    return [e.op("Mul", [gy[0], slope])]


@rule("Softplus")
def softplus(e, node, gy, need):
    return [e.op("Mul", [gy[0], e.op("Sigmoid", [node.input[0]])])]


@rule("Elu")
def elu(e, node, gy, need):
    x, y = node.input[0], node.output[0]
    alpha = node_attrs(node).get("alpha", 1.0)
    negative = e.op("Mul", [gy[0], e.op("Add", [y, e.scalar(alpha, x)])])
    return [_where(e, e.op("Greater", [x, e.scalar(0.0, x)]), gy[0], negative)]


@rule("Where")
def where(e, node, gy, need):
    cond, a, b = node.input
    zero = e.scalar(0.0, node.output[0])
    return [None,
            _unb(e, _where(e, cond, gy[0], zero), node, 1) if need[1] else None,
            _unb(e, _where(e, cond, zero, gy[0]), node, 2) if need[2] else None]


@rule("Expand")
def expand(e, node, gy, need):
    return [_unb(e, gy[0], node, 0), None]


@rule("Max", "Min")
def max_min(e, node, gy, need):
    """The gradient goes to the inputs equal to the result, split evenly among ties (torch.maximum)."""
    y = node.output[0]
    masks = [e.op("Cast", [e.op("Equal", [i, y])], to=e.dtype(y)) for i in node.input]
    count = masks[0] if len(masks) == 1 else e.op("Sum", masks)
    share = e.op("Div", [gy[0], count])
    return [_unb(e, e.op("Mul", [share, m]), node, i) if need[i] else None for i, m in enumerate(masks)]

