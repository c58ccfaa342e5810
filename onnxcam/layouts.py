"""Channels-first or channels-last: detect it for inputs and activations, and convert.

The CAM engine works on channels-first arrays (N, C, *S). TensorFlow exports keep activations
channels-last (N, *S, C); which one a tensor uses is read from its shape next to the input's.
"""
from __future__ import annotations

import numpy as np

from .errors import OnnxcamError

FIRST, LAST = "channels_first", "channels_last"
_ALIASES = {"NCHW": FIRST, "NCL": FIRST, "NCDHW": FIRST, "NC": FIRST, "CHANNELS_FIRST": FIRST,
            "NHWC": LAST, "NLC": LAST, "NDHWC": LAST, "CHANNELS_LAST": LAST}


def normalize_layout(layout: str | None) -> str | None:
    if layout is None:
        return None
    key = layout.strip().upper()
    if key not in _ALIASES:
        raise OnnxcamError(f"unknown layout {layout!r}; use NCHW / NHWC (or NCL / NLC, NCDHW / NDHWC)")
    return _ALIASES[key]


def input_layout(shape: tuple | None) -> str:
    """Guess from the model's input shape: the small static axis at position 1 or -1 holds channels."""
    if not shape or len(shape) < 3:
        return FIRST
    first, last = shape[1], shape[-1]
    first_static, last_static = isinstance(first, int) and first > 0, isinstance(last, int) and last > 0
    if first_static and (not last_static or first <= last):
        return FIRST
    if last_static and (not first_static or last < first):
        return LAST
    return FIRST


def spatial_shape(shape: tuple, layout: str) -> tuple:
    return tuple(shape[2:]) if layout == FIRST else tuple(shape[1:-1])


def _consistent(spatial: tuple, input_spatial: tuple) -> bool:
    """True when every activation axis is the input axis shrunk by one common stride (give or take 1)."""
    if len(spatial) != len(input_spatial) or any(s <= 0 or s > i for s, i in zip(spatial, input_spatial)):
        return False
    strides = [i / s for s, i in zip(spatial, input_spatial)]
    return all(abs(i / max(strides[0], 1e-9) - s) <= 1.0 + 1e-6 for s, i in zip(spatial, input_spatial))


def activation_layout(shape: tuple, input_spatial: tuple, input_layout_: str) -> str:
    """Layout of an activation: the reading whose spatial axes match the input's, else the input's."""
    first_ok = _consistent(spatial_shape(shape, FIRST), input_spatial)
    last_ok = _consistent(spatial_shape(shape, LAST), input_spatial)
    if first_ok != last_ok:
        return FIRST if first_ok else LAST
    return input_layout_


def to_channels_first(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == FIRST:
        return array
    return np.moveaxis(array, -1, 1)


def to_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of to_channels_first: channels-first array into ``layout``."""
    if layout == FIRST:
        return array
    return np.ascontiguousarray(np.moveaxis(array, 1, -1))
