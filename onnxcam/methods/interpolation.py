"""Separable linear interpolation over trailing spatial axes (1D linear, 2D bilinear, 3D trilinear).

Two sampling conventions, both as PyTorch defines them:
- half-pixel centres (``align_corners=False``; also OpenCV's ``cv2.resize`` default): used for final maps;
- corners aligned (``align_corners=True``; ``torch.nn.UpsamplingBilinear2d``): used for Score-CAM masks.

Each axis is interpolated as ``x0 + t * (x1 - x0)``, so a constant signal stays exactly constant (Score-CAM
relies on this to recognise constant channels, whose masks must be exactly zero).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _axis_coefficients(in_size: int, out_size: int, align_corners: bool):
    """Source indices (i0, i1) and fractions t mapping every output position onto the input axis."""
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    t = (src - i0).astype(np.float32)
    return i0, i1, t


def interpolation_matrix(in_size: int, out_size: int, *, align_corners: bool) -> np.ndarray:
    """(out_size, in_size) float32 weights of one axis' linear interpolation (the two-tap rows of the
    coefficients above): ``matrix @ signal`` resizes that axis. A 2D resize is then two MatMuls, which
    ONNX Runtime runs several times faster than its Resize op at CAM sizes (7² -> 224²)."""
    i0, i1, t = _axis_coefficients(in_size, out_size, align_corners)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, i0), np.float32(1) - t)
    np.add.at(matrix, (rows, i1), t)
    return matrix


def linear_resize(array: np.ndarray, size: Sequence[int], *, align_corners: bool) -> np.ndarray:
    """Resize the last ``len(size)`` axes of ``array`` to ``size`` (array axis order); float32 result."""
    out = np.asarray(array, dtype=np.float32)
    first_axis = out.ndim - len(size)
    for offset, out_size in enumerate(size):
        axis = first_axis + offset
        in_size = out.shape[axis]
        if in_size == out_size:
            continue  # both conventions sample exactly the input positions
        i0, i1, t = _axis_coefficients(in_size, int(out_size), align_corners)
        t = t.reshape((-1,) + (1,) * (out.ndim - axis - 1))
        x0 = np.take(out, i0, axis=axis)
        x1 = np.take(out, i1, axis=axis)
        out = x0 + t * (x1 - x0)
    return out
