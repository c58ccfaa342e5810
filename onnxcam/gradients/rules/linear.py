"""Rules for the linear layers: Gemm, MatMul, Conv (one ConvTranspose) and ConvTranspose (one Conv).

Gradients flow to the data input only when the weights do not depend on the wrt tensors (weights
are constants of the explanation); a weight on the path is reported as unsupported.
"""
from __future__ import annotations

import math

from . import rule
from .base import Emitter, Unsupported, node_attrs


@rule("Gemm")
def gemm(e: Emitter, node, gy, need):
    a = node_attrs(node)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)
    A, B = node.input[0], node.input[1]
    g = gy[0]

    def gemm_op(x, y, trans_x, trans_y):
        inputs = [x, y]
        if e.opset < 11:
            inputs.append(e.scalar(0.0, A))
        return e.op("Gemm", inputs, alpha=float(alpha), transA=trans_x, transB=trans_y)

    ga = gb = gc = None
    if need[0]:
        ga = gemm_op(B, g, tb, 1) if ta else gemm_op(g, B, 0, 1 - tb)
    if need[1]:
        gb = gemm_op(g, A, 1, ta) if tb else gemm_op(A, g, 1 - ta, 0)
    if len(node.input) > 2 and need[2]:
        scaled = g if beta == 1.0 else e.op("Mul", [g, e.scalar(beta, A)])
        gc = e.unbroadcast(scaled, e.shape(node.output[0]), node.input[2])
    return [ga, gb, gc][:len(node.input)]


@rule("MatMul")
def matmul(e: Emitter, node, gy, need):
    A, B = node.input
    ra, rb = e.rank(A), e.rank(B)
    sa, sb = e.shape(A), e.shape(B)
    g, gshape = gy[0], list(e.shape(node.output[0]) or [])
    # promote 1-D operands to matrices, and the gradient with them
    if rb == 1:
        g, gshape = e.unsqueeze(g, [len(gshape)]), gshape + [1]
    if ra == 1:
        g, gshape = e.unsqueeze(g, [len(gshape) - 1]), gshape[:-1] + [1] + gshape[-1:]
    A2, sa2 = (A, sa) if ra > 1 else (e.unsqueeze(A, [0]), [1] + sa)
    B2, sb2 = (B, sb) if rb > 1 else (e.unsqueeze(B, [1]), sb + [1])
    ga = gb = None
    if need[0]:
        full = e.op("MatMul", [g, e.transpose_last_two(B2, len(sb2))])
        full_shape = gshape[:-1] + [sa2[-1]]
        ga = e.unbroadcast(full, full_shape, A2, sa2)
        if ra == 1:
            ga = e.squeeze(ga, [0])
    if need[1]:
        full = e.op("MatMul", [e.transpose_last_two(A2, len(sa2)), g])
        full_shape = gshape[:-2] + [sb2[-2], gshape[-1]]
        gb = e.unbroadcast(full, full_shape, B2, sb2)
        if rb == 1:
            gb = e.squeeze(gb, [1])
    return [ga, gb]


def _conv_geometry(e: Emitter, node, x: str, w: str):
    """(kernel, strides, dilations, pads_begin, pads_end) with auto_pad resolved to explicit pads."""
    a = node_attrs(node)
    rank = e.rank(x)
    n = rank - 2
    kernel = a.get("kernel_shape") or e.static_dims(w, range(2, rank))
    strides = a.get("strides") or [1] * n
    dilations = a.get("dilations") or [1] * n
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = a.get("pads") or [0] * (2 * n)
        return kernel, strides, dilations, list(pads[:n]), list(pads[n:])
    if auto_pad == "VALID":
        return kernel, strides, dilations, [0] * n, [0] * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad={auto_pad!r}")
    size = e.static_dims(x, range(2, rank))
    begin, end = [], []
    for i in range(n):
        out = math.ceil(size[i] / strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i], 0)
        small = total // 2
        b = small if auto_pad == "SAME_UPPER" else total - small
        begin.append(b)
        end.append(total - b)
    return kernel, strides, dilations, begin, end


def transposed_fit(size: int, out: int, k: int, s: int, d: int, pad_begin: int) -> tuple[int, int]:
    """(pad_end, output_padding) making a ConvTranspose of an ``out``-long map exactly ``size`` long.

    Positions of the input that no window reached get zeros (output_padding); windows that reached
    past the input (ceil_mode, end padding) are cropped (pad_end).
    """
    full = s * (out - 1) + d * (k - 1) + 1 - pad_begin
    if full >= size:
        return full - size, 0
    if size - full >= max(s, d):
        raise Unsupported("uncovered input tail longer than the stride")
    return 0, size - full


def scatter_windows(e: Emitter, g: str, y: str, x: str, weight: str, kernel, strides, dilations, begin,
                    group: int) -> str:
    """ConvTranspose of ``g`` (shaped like forward tensor ``y``) onto the grid of ``x`` (exact size).

    Static sizes give the exact pads/output_padding; sizes known only at run time get an uncropped
    ConvTranspose that is then cut (Slice) or zero-extended (Pad) to x's spatial size.
    """
    rank = e.rank(x)
    n = rank - 2
    geometry = dict(kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations), group=group)
    s_in, s_out = e.shape(x)[2:], (e.shape(y) or [None] * rank)[2:]
    if all(isinstance(d, int) for d in list(s_in) + list(s_out)):
        ends, extra = [], []
        for i in range(n):
            pe, op = transposed_fit(s_in[i], s_out[i], kernel[i], strides[i], dilations[i], begin[i])
            ends.append(pe)
            extra.append(op)
        return e.op("ConvTranspose", [g, weight], pads=list(begin) + ends,
                    output_padding=extra if any(extra) else None, **geometry)
    spread = e.op("ConvTranspose", [g, weight], pads=list(begin) + [0] * n, **geometry)
    spatial = e.op("Slice", [e.shape_of(x), e.ints([2]), e.ints([rank])])
    cut = e.op("Slice", [spread, e.ints([0] * n), spatial, e.ints(range(2, rank))])
    short = e.op("Sub", [spatial, e.op("Slice", [e.op("Shape", [cut]), e.ints([2]), e.ints([rank])])])
    pads = e.op("Concat", [e.ints([0] * (n + 2)), e.ints([0, 0]), short], axis=0)
    return e.op("Pad", [cut, pads])


@rule("Conv")
def conv(e: Emitter, node, gy, need):
    """d/dX of a convolution: a Conv with flipped, transposed weights when the stride is 1 (ONNX Runtime
    runs Conv up to 3x faster than ConvTranspose), else one ConvTranspose with matching geometry."""
    if any(need[1:]):
        raise Unsupported("gradient with respect to the weights or bias (they depend on the wrt tensor)")
    x, w = node.input[0], node.input[1]
    kernel, strides, dilations, begin, end = _conv_geometry(e, node, x, w)
    group = node_attrs(node).get("group", 1)
    tail = [None] * (len(node.input) - 1)
    reach = [d * (k - 1) for k, d in zip(kernel, dilations)]
    if all(s == 1 for s in strides) and all(b <= r and p <= r for b, p, r in zip(begin, end, reach)):
        pads = [r - b for r, b in zip(reach, begin)] + [r - p for r, p in zip(reach, end)]
        return [e.op("Conv", [gy[0], _adjoint_weight(e, w, group, len(kernel))], kernel_shape=list(kernel),
                     dilations=list(dilations), pads=pads, group=group)] + tail
    return [scatter_windows(e, gy[0], node.output[0], x, w, kernel, strides, dilations, begin, group)] + tail


def _adjoint_weight(e: Emitter, w: str, group: int, n: int) -> str:
    """W [M, C/g, *k] -> W' [C, M/g, *k] with kernels flipped: the weight of the stride-1 adjoint Conv.
    Built from W with graph ops, which ONNX Runtime folds into a constant when the session starts."""
    out_channels, in_per_group = e.static_dims(w, [0, 1])
    axes = list(range(2, 2 + n))
    flipped = e.op("Slice", [w, e.ints([-1] * n), e.ints([-2**63] * n), e.ints(axes), e.ints([-1] * n)])
    if group == 1:
        return e.op("Transpose", [flipped], perm=[1, 0] + axes)
    grouped = e.op("Reshape", [flipped, e.ints([group, out_channels // group, in_per_group, -1])])
    swapped = e.op("Transpose", [grouped], perm=[0, 2, 1, 3])
    kernel = e.static_dims(w, axes)
    return e.op("Reshape", [swapped, e.ints([group * in_per_group, out_channels // group] + kernel)])


@rule("ConvTranspose")
def conv_transpose(e: Emitter, node, gy, need):
    if any(need[1:]):
        raise Unsupported("gradient with respect to the weights or bias (they depend on the wrt tensor)")
    a = node_attrs(node)
    if a.get("output_shape") or a.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise Unsupported("output_shape / auto_pad SAME (pads chosen by the runtime); export explicit pads")
    x, w, y = node.input[0], node.input[1], node.output[0]
    rank = e.rank(x)
    n = rank - 2
    kernel = a.get("kernel_shape") or e.static_dims(w, range(2, rank))
    strides = a.get("strides") or [1] * n
    dilations = a.get("dilations") or [1] * n
    pads = a.get("pads") or [0] * (2 * n) if a.get("auto_pad", "NOTSET") != "VALID" else [0] * (2 * n)
    size, out = e.static_dims(x, range(2, rank)), e.static_dims(y, range(2, rank))
    for i in range(n):
        got = (out[i] + pads[i] + pads[n + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        if got != size[i]:
            raise Unsupported("output_padding not below the stride")
    gx = e.op("Conv", [gy[0], w], kernel_shape=list(kernel), strides=list(strides),
              dilations=list(dilations), pads=list(pads), group=a.get("group", 1))
    return [gx] + [None] * (len(node.input) - 1)
