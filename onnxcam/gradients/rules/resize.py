"""Resize: nearest and (bi/tri)linear resizing is separable and linear, so with static shapes its gradient
is, per resized axis, a product with the transposed constant interpolation matrix (out x in).

Supported: mode nearest (every nearest_mode), linear and cubic (cubic_coeff_a, exclude_outside);
coordinate_transformation_mode half_pixel, pytorch_half_pixel, align_corners, asymmetric,
half_pixel_symmetric; scales or sizes given as constants. Not supported: antialias,
tf_crop_and_resize, the opset-18 axes / keep_aspect_ratio_policy attributes, run-time scales or sizes.
The same matrices serve the ort-training backend's Resize rewrite (gradients/canonical/resize.py).
"""
from __future__ import annotations

import numpy as np

from . import rule
from .base import Emitter, Unsupported, node_attrs

MODES = ("nearest", "linear", "cubic")
TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")


def source_coordinates(size_in: int, size_out: int, scale: float, mode: str) -> np.ndarray:
    """Input coordinate of every output index, in float32 like ONNX Runtime's kernels."""
    o = np.arange(size_out, dtype=np.float32)
    s = np.float32(scale)
    if mode == "half_pixel":
        return (o + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / s - 0.5 if size_out > 1 else np.zeros(1, np.float32)
    if mode == "align_corners":
        if size_out == 1:
            return np.zeros(1, np.float32)
        return o * np.float32(size_in - 1) / np.float32(size_out - 1)
    if mode == "asymmetric":
        return o / s
    adjustment = np.float32(size_out) / (s * np.float32(size_in))
    offset = np.float32(size_in) / 2 * (1 - adjustment)
    return offset + (o + 0.5) / s - 0.5


def interpolation_matrix(size_in: int, size_out: int, scale: float, attrs: dict) -> np.ndarray:
    """M (out x in) with resized = M @ original along one axis."""
    x = source_coordinates(size_in, size_out, scale, attrs.get("coordinate_transformation_mode", "half_pixel"))
    m = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    if attrs.get("mode", "nearest") == "nearest":
        rounding = attrs.get("nearest_mode", "round_prefer_floor")
        pick = {"round_prefer_floor": lambda v: np.ceil(v - 0.5), "round_prefer_ceil": lambda v: np.floor(v + 0.5),
                "floor": np.floor, "ceil": np.ceil}[rounding]
        m[rows, np.clip(pick(x), 0, size_in - 1).astype(int)] = 1
        return m
    if attrs.get("mode") == "cubic":
        return _cubic_matrix(x.astype(np.float64), size_in, float(attrs.get("cubic_coeff_a", -0.75)),
                             bool(attrs.get("exclude_outside", 0)))
    x = np.clip(x, 0, size_in - 1).astype(np.float64)
    low = np.floor(x).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = x - low
    np.add.at(m, (rows, low), 1 - frac)
    np.add.at(m, (rows, high), frac)
    return m


def _cubic_weight(distance: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a`` (ONNX's cubic_coeff_a)."""
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _cubic_matrix(x: np.ndarray, size_in: int, a: float, exclude_outside: bool) -> np.ndarray:
    """Four taps per output around floor(x); taps past the edge read the edge pixel, or are dropped and
    the rest renormalised with exclude_outside (as ONNX defines cubic resizing)."""
    m = np.zeros((len(x), size_in))
    base = np.floor(x).astype(int)
    for row, (xo, b) in enumerate(zip(x, base)):
        taps = np.arange(b - 1, b + 3)
        weights = _cubic_weight(xo - taps, a)
        if exclude_outside:
            weights = np.where((taps >= 0) & (taps < size_in), weights, 0.0)
            weights = weights / weights.sum()
        np.add.at(m[row], np.clip(taps, 0, size_in - 1), weights)
    return m


@rule("Resize")
def resize(e: Emitter, node, gy, need):
    a = node_attrs(node)
    if a.get("mode", "nearest") not in MODES:
        raise Unsupported(f"mode={a.get('mode')!r}")
    if a.get("coordinate_transformation_mode", "half_pixel") not in TRANSFORMS:
        raise Unsupported(f"coordinate_transformation_mode={a['coordinate_transformation_mode']!r}")
    if a.get("antialias", 0) or "axes" in a or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise Unsupported("antialias / axes / keep_aspect_ratio_policy")
    if e.opset < 11 or any(need[1:]):
        raise Unsupported("opset-10 Resize or a gradient for roi/scales/sizes")
    x = node.input[0]
    rank = e.rank(x)
    size_in = e.static_dims(x, range(rank))
    scales_name = node.input[2] if len(node.input) > 2 else ""
    sizes_name = node.input[3] if len(node.input) > 3 else ""
    scales = e.value(scales_name)
    if scales is not None and scales.size:
        scales = [float(s) for s in scales.reshape(-1)]
        size_out = [int(np.floor(n * s)) for n, s in zip(size_in, scales)]
    elif sizes_name:
        size_out = [int(v) for v in e.required_value(sizes_name, "Resize sizes").reshape(-1)]
        scales = [o / n for o, n in zip(size_out, size_in)]
    else:
        raise Unsupported("Resize scales/sizes must be constants")
    g = gy[0]
    for axis in range(rank):
        if size_in[axis] == size_out[axis] and scales[axis] == 1.0:
            continue
        if axis < 2 and rank > 2:
            raise Unsupported("resizing the batch or channel axis")
        m = interpolation_matrix(size_in[axis], size_out[axis], scales[axis], a)
        g = _contract(e, g, axis, rank, m, x)
    return [g] + [None] * (len(node.input) - 1)


def _contract(e: Emitter, g: str, axis: int, rank: int, m: np.ndarray, like: str) -> str:
    """Gradient along ``axis``: g (..., out, ...) -> (..., in, ...) with M^T."""
    if axis == rank - 1:
        return e.op("MatMul", [g, e.array(m, like)])
    if axis == rank - 2:
        return e.op("MatMul", [e.array(m.T, like), g])
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = e.op("MatMul", [e.op("Transpose", [g], perm=perm), e.array(m, like)])
    return e.op("Transpose", [moved], perm=[int(i) for i in np.argsort(perm)])
