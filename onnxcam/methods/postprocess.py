"""From layer maps to input-sized maps in [0, 1], as pytorch-grad-cam's ``scale_cam_image`` and
``aggregate_multi_layers`` do: per layer relu → (x - min) / (max + 1e-7) → resize; across layers
relu → mean → the same normalisation. A map that is all zero (or constant) becomes all zero, never NaN
(for finite input).

Sizes are given in array axis order: (L,), (H, W) or (D, H, W).
"""
from __future__ import annotations

from collections.abc import Sequence

from .._lazy import cv2
import numpy as np

from ..errors import OnnxcamError
from .interpolation import linear_resize

NORMALIZE_EPS = 1e-7


def normalize(maps) -> np.ndarray:
    """Per sample: subtract the min, divide by (max + 1e-7). (N, *S) float32, a new array."""
    maps = np.array(maps, dtype=np.float32)          # a copy: normalised in place below
    flat = maps.reshape(maps.shape[0], -1)
    flat -= flat.min(axis=1, keepdims=True)
    flat /= flat.max(axis=1, keepdims=True) + np.float32(NORMALIZE_EPS)
    return maps


def resize(maps, size: Sequence[int]) -> np.ndarray:
    """Resize (N, *S) maps to (N, *size): cv2.resize bilinear for 2D, half-pixel linear/trilinear else."""
    maps = np.asarray(maps, dtype=np.float32)
    size = tuple(int(s) for s in size)
    if len(size) != maps.ndim - 1 or not 1 <= len(size) <= 3:
        raise OnnxcamError(f"cannot resize maps of shape {maps.shape[1:]} to {size}: the input has "
                           f"{len(size)} spatial axes but the node has {maps.ndim - 1}; pick a node "
                           "with the input's spatial layout")
    if maps.shape[1:] == size:
        return maps.copy()
    if len(size) == 2:
        height, width = size
        return np.stack([cv2.resize(np.ascontiguousarray(m), (width, height)) for m in maps]).reshape(
            (maps.shape[0],) + size)
    return linear_resize(maps, size, align_corners=False)


def layer_to_input(maps, size: Sequence[int]) -> np.ndarray:
    """One layer's maps (N, *S) → relu → normalise → resized to the input's spatial size."""
    maps = np.maximum(np.asarray(maps, dtype=np.float32), 0)
    return resize(normalize(maps), size)


def fuse_layers(layer_maps: Sequence[np.ndarray]) -> np.ndarray:
    """Input-sized maps of one or more layers (each (N, *size)) → relu → mean → normalise, in [0, 1]."""
    if not layer_maps:
        raise ValueError("fuse_layers needs at least one layer's maps")
    if len(layer_maps) == 1:    # the mean of one layer is that layer: skip the stack and the copy
        return normalize(np.maximum(np.asarray(layer_maps[0], dtype=np.float32), 0))
    stacked = np.maximum(np.stack([np.asarray(m, dtype=np.float32) for m in layer_maps], axis=1), 0)
    return normalize(stacked.mean(axis=1))
