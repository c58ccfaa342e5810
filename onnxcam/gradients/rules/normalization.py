"""Rules for Softmax/LogSoftmax and the normalization layers (inference-mode statistics)."""
from __future__ import annotations

from . import rule
from .base import Emitter, Unsupported, node_attrs


def _softmax_axes(e: Emitter, node) -> list[int]:
    """Opset 13+ normalizes over one axis (default -1); before, over all axes from ``axis`` (default 1)."""
    rank = e.rank(node.input[0])
    a = node_attrs(node)
    if e.opset >= 13:
        return [a.get("axis", -1) % rank]
    return list(range(a.get("axis", 1) % rank, rank))


@rule("Softmax")
def softmax(e: Emitter, node, gy, need):
    y = node.output[0]
    weighted = e.reduce("ReduceSum", e.op("Mul", [gy[0], y]), _softmax_axes(e, node), keepdims=1)
    return [e.op("Mul", [y, e.op("Sub", [gy[0], weighted])])]


@rule("LogSoftmax")
def log_softmax(e: Emitter, node, gy, need):
    y = node.output[0]
    total = e.reduce("ReduceSum", gy[0], _softmax_axes(e, node), keepdims=1)
    return [e.op("Sub", [gy[0], e.op("Mul", [e.op("Exp", [y]), total])])]


def _per_channel(e: Emitter, v: str, rank: int) -> str:
    """Reshape a [C] vector to [C, 1, ..., 1] so it broadcasts over an N, C, *spatial tensor."""
    return e.op("Reshape", [v, e.ints([-1] + [1] * (rank - 2))])


@rule("BatchNormalization")
def batch_norm(e: Emitter, node, gy, need):
    a = node_attrs(node)
    if a.get("training_mode", 0) or (e.opset < 9 and not a.get("spatial", 1)):
        raise Unsupported("training_mode=1 (batch statistics); export the model in eval mode")
    if any(need[1:]):
        raise Unsupported("gradient with respect to scale/bias/mean/var")
    x, scale, var = node.input[0], node.input[1], node.input[4]
    std = e.op("Sqrt", [e.op("Add", [var, e.scalar(a.get("epsilon", 1e-5), var)])])
    factor = e.op("Div", [scale, std])
    if e.dtype(scale) != e.dtype(x):
        factor = e.op("Cast", [factor], to=e.dtype(x))
    return [e.op("Mul", [gy[0], _per_channel(e, factor, e.rank(x))])] + [None] * 4


def _normalized_grad(e: Emitter, x: str, g_scaled: str, axes: list[int], epsilon: float) -> str:
    """d/dx of (x - mean) / sqrt(var + eps) over ``axes``, applied to the upstream g * scale."""
    mean = e.reduce("ReduceMean", x, axes)
    centred = e.op("Sub", [x, mean])
    var = e.reduce("ReduceMean", e.op("Mul", [centred, centred]), axes)
    inv_std = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, e.scalar(epsilon, x)])])])
    x_hat = e.op("Mul", [centred, inv_std])
    mean_g = e.reduce("ReduceMean", g_scaled, axes)
    mean_gx = e.reduce("ReduceMean", e.op("Mul", [g_scaled, x_hat]), axes)
    inner = e.op("Sub", [e.op("Sub", [g_scaled, mean_g]), e.op("Mul", [x_hat, mean_gx])])
    return e.op("Mul", [inv_std, inner])


@rule("LayerNormalization")
def layer_norm(e: Emitter, node, gy, need):
    if any(need[1:]):
        raise Unsupported("gradient with respect to scale/bias")
    if any(g is not None for g in gy[1:]):
        raise Unsupported("gradient through the Mean/InvStdDev outputs")
    a = node_attrs(node)
    x = node.input[0]
    rank = e.rank(x)
    axes = list(range(a.get("axis", -1) % rank, rank))
    g_scaled = e.op("Mul", [gy[0], node.input[1]])
    return [_normalized_grad(e, x, g_scaled, axes, a.get("epsilon", 1e-5))] + [None] * (len(node.input) - 1)


@rule("InstanceNormalization")
def instance_norm(e: Emitter, node, gy, need):
    if any(need[1:]):
        raise Unsupported("gradient with respect to scale/bias")
    x, scale = node.input[0], node.input[1]
    rank = e.rank(x)
    g_scaled = e.op("Mul", [gy[0], _per_channel(e, scale, rank)])
    return [_normalized_grad(e, x, g_scaled, list(range(2, rank)),
                             node_attrs(node).get("epsilon", 1e-5)), None, None]
