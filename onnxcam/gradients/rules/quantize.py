"""Rules for quantized graphs: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear.

These follow the straight-through estimator of quantization-aware training (torch's
``fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` backward): quantization passes the
gradient unchanged (scaled by 1/scale into integer units) where ``round(x / scale) + zero_point`` lies
in the representable range of the integer type, and zero where it saturates. That zero is what gives
the QDQ pairs onnxruntime's quantizer writes after a Conv, in place of a removed Relu/Clip, the
gradient of the activation they replaced. DequantizeLinear is linear: ``(q - zero_point) * scale``.
The com.microsoft Q/DQ ops (the quantizer's 16-bit QDQ) have the same semantics and rules.

The gradient of an integer tensor is a float tensor of the scale's type, in integer units:
d score / d q. Scales and zero points are treated as constants (no gradient flows into them; where
they are computed from the differentiated path, as in DynamicQuantizeLinear, the composite
Dequantize(Quantize(x)) is the identity under the estimator, so nothing is lost).
"""
from __future__ import annotations


from onnx import TensorProto

from . import rule
from .base import FLOAT_TYPES, Emitter, Unsupported, node_attrs

# integer types a QuantizeLinear may write, with their representable range
RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
          TensorProto.INT16: (-32768, 32767), TensorProto.INT32: (-2**31, 2**31 - 1)}
for _name, _lo, _hi in (("UINT4", 0, 15), ("INT4", -8, 7)):
    if hasattr(TensorProto, _name):
        RANGES[getattr(TensorProto, _name)] = (_lo, _hi)


def _per_axis(e: Emitter, param: str, x: str, node) -> str:
    """``param`` (a scale or zero point) shaped to broadcast against ``x``: a 1-D per-axis
    parameter gets trailing ones after its axis."""
    a = node_attrs(node)
    if a.get("block_size", 0):
        raise Unsupported("blocked quantization (block_size) is not supported")
    p_shape = e.shape(param)
    if p_shape is None:
        raise Unsupported(f"rank of {param!r} unknown (shape inference failed)")
    if len(p_shape) == 0 or p_shape == [1]:
        return param
    rank = e.rank(x)
    axis = a.get("axis", 1) % rank
    if len(p_shape) != 1:
        raise Unsupported(f"scale of rank {len(p_shape)}")
    return e.op("Reshape", [param, e.ints([-1] + [1] * (rank - 1 - axis))])


def _as_float(e: Emitter, name: str, like: str) -> str:
    return e.op("Cast", [name], to=e.dtype(like))


def _quantized_type(e: Emitter, node) -> int:
    out = node.output[0]
    try:
        return e.dtype(out)
    except Unsupported:
        pass
    if len(node.input) > 2 and node.input[2]:
        return e.dtype(node.input[2])
    return node_attrs(node).get("output_dtype") or TensorProto.UINT8


@rule("DequantizeLinear", integer=True, domains=("com.microsoft",))
def dequantize(e: Emitter, node, gy, need):
    """y = (q - zero_point) * scale: d score / d q = gy * scale (float, in integer units)."""
    q, scale = node.input[0], node.input[1]
    if e.dtype(scale) not in FLOAT_TYPES:
        raise Unsupported("non-float scale")
    g = e.op("Mul", [gy[0], _per_axis(e, scale, q, node)]) if need[0] else None
    return [g] + [None] * (len(node.input) - 1)


@rule("QuantizeLinear", integer=True, domains=("com.microsoft",))
def quantize(e: Emitter, node, gy, need):
    """q = saturate(round(x / scale) + zero_point): straight-through where not saturated."""
    x, scale = node.input[0], node.input[1]
    qtype = _quantized_type(e, node)
    if qtype not in RANGES:
        raise Unsupported(f"quantized type {TensorProto.DataType.Name(qtype)} (float8 is not supported)")
    if not need[0]:
        return [None] * len(node.input)
    s = _per_axis(e, scale, x, node)
    if e.dtype(scale) != e.dtype(x):
        s = _as_float(e, s, x)
    v = e.op("Round", [e.op("Div", [x, s])])
    if len(node.input) > 2 and node.input[2]:
        v = e.op("Add", [v, _as_float(e, _per_axis(e, node.input[2], x, node), x)])
    lo, hi = RANGES[qtype]
    inside = e.op("Not", [e.op("Or", [e.op("Less", [v, e.scalar(float(lo), x)]),
                                      e.op("Greater", [v, e.scalar(float(hi), x)])])])
    g = gy[0]  # the float type of the scale (see the DequantizeLinear rule)
    if e.dtype(scale) != e.dtype(x):
        g = _as_float(e, g, x)
    g = e.op("Mul", [e.op("Div", [g, s]), e.op("Cast", [inside], to=e.dtype(x))])
    return [g] + [None] * (len(node.input) - 1)


@rule("DynamicQuantizeLinear", integer=True)
def dynamic_quantize(e: Emitter, node, gy, need):
    """The scale spans [min(0, min x), max(0, max x)], so nothing saturates: d x = d q / scale."""
    if len(gy) > 1 and any(g is not None for g in gy[1:]):
        raise Unsupported("gradient through the computed scale or zero point")
    return [e.op("Div", [gy[0], node.output[1]])]  # x, the scale and the gradient are float32



