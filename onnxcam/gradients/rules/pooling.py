"""Rules for pooling and reductions.

MaxPool sends each output's gradient to the arg-max the forward node reports in its Indices output
(first maximum of the window, as torch), and overlapping windows add up: ScatterElements with
reduction='add' from opset 16; before that, one-hot masks per kernel offset and one depthwise
ConvTranspose, which is exact too. GlobalMaxPool uses the first arg-max (torch's adaptive max pool).
ReduceMax/ReduceMin split the gradient evenly among tied extremes, like torch.amax/amin.
"""
from __future__ import annotations

import itertools

import numpy as np
from onnx import helper, numpy_helper

from . import rule
from .base import Emitter, Unsupported, node_attrs
from .linear import _conv_geometry, scatter_windows


def _pool_geometry(e: Emitter, node):
    a = node_attrs(node)
    if "kernel_shape" not in a:
        raise Unsupported("kernel_shape attribute missing")
    return _conv_geometry(e, node, node.input[0], None)


@rule("MaxPool")
def max_pool(e: Emitter, node, gy, need):
    a = node_attrs(node)
    if a.get("storage_order", 0):
        raise Unsupported("storage_order=1")
    if gy[0] is None:
        return [None]
    x, y, indices = node.input[0], node.output[0], node.output[1]
    if e.opset >= 16:
        flat = e.ints([-1])
        numel = e.op("Reshape", [e.op("Size", [x]), e.ints([1])])
        zero = e.op("ConstantOfShape", [numel], value=_zero_tensor(e, x))
        scattered = e.op("ScatterElements", [zero, e.op("Reshape", [indices, flat]),
                                             e.op("Reshape", [gy[0], flat])], axis=0, reduction="add")
        return [e.op("Reshape", [scattered, e.shape_of(x)])]
    return [_max_pool_by_masks(e, node, gy[0], x, y, indices)]


def _zero_tensor(e: Emitter, like: str):
    return numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(e.dtype(like))), "")


def _max_pool_by_masks(e: Emitter, node, g: str, x: str, y: str, indices: str) -> str:
    """Opset < 16: for each kernel offset, a mask of the windows whose arg-max sits at that offset;
    one depthwise ConvTranspose with one-hot kernels puts every masked gradient in place (adding)."""
    kernel, strides, dilations, begin, _ = _pool_geometry(e, node)
    rank = e.rank(x)
    channels = e.static_dims(x, [1])[0]
    size, out = e.static_dims(x, range(2, rank)), e.static_dims(y, range(2, rank))
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    plane = int(np.prod(size))
    expected = np.full([len(offsets)] + out, -1, dtype=np.int64)
    grids = np.meshgrid(*[np.arange(o) for o in out], indexing="ij")
    for j, offset in enumerate(offsets):
        pos = [grids[i] * strides[i] - begin[i] + offset[i] * dilations[i] for i in range(len(out))]
        valid = np.all([(p >= 0) & (p < s) for p, s in zip(pos, size)], axis=0)
        flat = np.ravel_multi_index([np.clip(p, 0, s - 1) for p, s in zip(pos, size)], size)
        expected[j][valid] = flat[valid]
    within_plane = e.op("Mod", [indices, e.const(np.array(plane, np.int64))])
    hits = e.op("Equal", [e.unsqueeze(within_plane, [2]), e.const(expected)])
    masked = e.op("Mul", [e.op("Cast", [hits], to=e.dtype(x)), e.unsqueeze(g, [2])])
    stacked = e.op("Reshape", [masked, e.ints([-1, channels * len(offsets)] + out)])
    weight = np.zeros([channels * len(offsets), 1] + list(kernel), dtype=e.np_dtype(x))
    for c in range(channels):
        for j, offset in enumerate(offsets):
            weight[(c * len(offsets) + j, 0) + offset] = 1
    return scatter_windows(e, stacked, y, x, e.array(weight, x), kernel, strides, dilations, begin,
                           channels)


def _window_counts(size, out, k, s, d, begin, end, include_pad):
    counts = []
    for o in range(out):
        positions = o * s - begin + d * np.arange(k)
        low, high = (-begin, size + end) if include_pad else (0, size)
        counts.append(int(np.sum((positions >= low) & (positions < high))))
    return np.array(counts)


@rule("AveragePool")
def average_pool(e: Emitter, node, gy, need):
    a = node_attrs(node)
    x, y = node.input[0], node.output[0]
    kernel, strides, dilations, begin, end = _pool_geometry(e, node)
    rank = e.rank(x)
    channels = e.static_dims(x, [1])[0]
    size, out = e.static_dims(x, range(2, rank)), e.static_dims(y, range(2, rank))
    include_pad = a.get("count_include_pad", 0)
    divisor = np.ones(out, dtype=np.float64)
    for i in range(len(out)):
        c = _window_counts(size[i], out[i], kernel[i], strides[i], dilations[i], begin[i], end[i], include_pad)
        divisor = divisor * c.reshape([-1 if j == i else 1 for j in range(len(out))])
    share = e.op("Mul", [gy[0], e.array(1.0 / divisor, x)])
    ones = e.array(np.ones([channels, 1] + list(kernel)), x)
    return [scatter_windows(e, share, y, x, ones, kernel, strides, dilations, begin, channels)]


def _spatial_count(e: Emitter, x: str, axes) -> str:
    """Number of elements over ``axes`` of ``x`` as a scalar of x's type (static when possible)."""
    s = e.shape(x)
    dims = [s[a] for a in axes] if s is not None else [None]
    if all(isinstance(d, int) for d in dims):
        return e.scalar(float(np.prod(dims)), x)
    picked = e.op("Gather", [e.shape_of(x), e.ints(axes)])
    return e.op("Cast", [e.op("ReduceProd", [picked], keepdims=0)], to=e.dtype(x))


@rule("GlobalAveragePool")
def global_average_pool(e: Emitter, node, gy, need):
    x = node.input[0]
    s = e.shape(x)
    spatial = list(s[2:]) if s is not None else [None]
    if all(isinstance(d, int) for d in spatial):
        # static spatial size: one broadcast Mul by a constant 1/(H*W) plane, no Shape/Expand at run time
        plane = np.full([1, 1, *spatial], 1.0 / float(np.prod(spatial)), dtype=e.np_dtype(x))
        return [e.broadcasts(e.op("Mul", [gy[0], e.const(plane)]),       # same values, one per channel:
                             e.op("Mul", [gy[0], e.scalar(1.0 / float(np.prod(spatial)), x)]))]
    share = e.op("Div", [gy[0], _spatial_count(e, x, range(2, e.rank(x)))])
    return [e.expand_to(share, x)]


@rule("GlobalMaxPool")
def global_max_pool(e: Emitter, node, gy, need):
    x = node.input[0]
    flat = e.op("Reshape", [x, e.ints([0, 0, -1])])
    first_max = e.op("ArgMax", [flat], axis=2, keepdims=1)
    zero = e.op("ConstantOfShape", [e.shape_of(flat)], value=_zero_tensor(e, x))
    g = e.op("Reshape", [gy[0], e.ints([0, 0, 1])])
    return [e.op("Reshape", [e.op("ScatterElements", [zero, first_max, g], axis=2), e.shape_of(x)])]


def _reduce_axes(e: Emitter, node) -> list[int] | None:
    """Normalized axes of a Reduce* node, or None for an identity (noop_with_empty_axes)."""
    a = node_attrs(node)
    rank = e.rank(node.input[0])
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        axes = [int(v) for v in e.required_value(node.input[1], "axes").reshape(-1)]
    else:
        axes = []
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return None
        axes = list(range(rank))
    return sorted(ax % rank for ax in axes)


@rule("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceLogSumExp")
def reduce(e: Emitter, node, gy, need):
    x, y = node.input[0], node.output[0]
    tail = [None] * (len(node.input) - 1)
    axes = _reduce_axes(e, node)
    if axes is None:  # identity, except for the element-wise part of the op
        axes = []
    keep = node_attrs(node).get("keepdims", 1)
    g = gy[0] if keep or not axes else e.unsqueeze(gy[0], axes)
    y2 = y if keep or not axes else e.unsqueeze(y, axes)
    op = node.op_type
    if op == "ReduceSum":
        gx = e.expand_to(g, x)
        if e.is_ones(gy[0]):
            e.mark_ones(gx)
    elif op == "ReduceMean":
        gx = e.expand_to(e.op("Div", [g, _spatial_count(e, x, axes)]), x)
    elif op == "ReduceSumSquare":
        gx = e.op("Mul", [e.op("Mul", [g, e.scalar(2.0, x)]), x])
    elif op == "ReduceLogSumExp":
        gx = e.op("Mul", [g, e.op("Exp", [e.op("Sub", [x, y2])])])
    else:
        mask = e.op("Cast", [e.op("Equal", [x, y2])], to=e.dtype(x))
        count = e.reduce("ReduceSum", mask, axes, keepdims=1) if axes else mask
        gx = e.op("Mul", [mask, e.op("Div", [g, count])])
    return [gx] + tail

