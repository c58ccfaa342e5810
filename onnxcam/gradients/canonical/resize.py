"""Resize (whose gradient has no CPU kernel in onnxruntime-training) as one MatMul per resized axis with
the interpolation matrix the portable Resize rule uses, so both backends share one definition."""
from __future__ import annotations

import numpy as np
from onnx import helper

from ...graph import attributes
from ..rules.resize import MODES, TRANSFORMS, interpolation_matrix
from . import Rewriter, _op, rewrite

@rewrite("Resize")
def _resize(rw: Rewriter, node):
    """Resize -> one MatMul per resized axis with its interpolation matrix (static sizes only)."""
    x = node.input[0]
    shape = rw.shape(x)
    attrs = attributes(node)
    if (rw.opset < 11 or shape is None or any(d is None for d in shape[2:])
            or attrs.get("mode", "nearest") not in MODES
            or attrs.get("coordinate_transformation_mode", "half_pixel") not in TRANSFORMS
            or attrs.get("antialias", 0) or "axes" in attrs
            or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch"):
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
        if scales is not None:
            scale = float(scales[axis])
            size_out = int(np.floor(shape[axis] * scale))
        else:
            size_out = int(sizes[axis])
            scale = size_out / shape[axis]
        matrix = interpolation_matrix(shape[axis], size_out, scale, attrs)       # (out, in)
        out = node.output[0] if i == len(resized_axes) - 1 else rw.name(node, f"resized_axis{axis}")
        matrix_t = rw.const(node, f"matrix_axis{axis}", matrix.T, rw.dtype_of(x))  # (in, out)
        if axis == rank - 1:
            n, _ = _op(rw, node, "MatMul", [current, matrix_t], "", outputs=[out])
            nodes.append(n)
        else:  # move the axis last, interpolate, move it back
            perm = [a for a in range(rank) if a != axis] + [axis]
            inverse = [int(a) for a in np.argsort(perm)]
            t, moved = _op(rw, node, "Transpose", [current], f"moved_axis{axis}", perm=perm)
            m, interpolated = _op(rw, node, "MatMul", [moved, matrix_t], f"interpolated_axis{axis}")
            b, _ = _op(rw, node, "Transpose", [interpolated], "", outputs=[out], perm=inverse)
            nodes += [t, m, b]
        current = out
    return nodes
