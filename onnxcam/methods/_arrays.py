"""Input checks and the one reduction every weight-based CAM shares."""
from __future__ import annotations

import numpy as np

from ..errors import OnnxcamError


def as_activations(A) -> np.ndarray:
    """``A`` as float32 (N, C, *S) with 1 to 3 spatial axes, or a user-facing error."""
    A = np.asarray(A, dtype=np.float32)
    if not 3 <= A.ndim <= 5:
        raise OnnxcamError(f"CAM needs activations shaped (N, C, *spatial) with 1 to 3 spatial axes; got "
                           f"shape {A.shape} — pick a node before global pooling (a convolutional feature map)")
    return A


def as_pair(A, G) -> tuple[np.ndarray, np.ndarray]:
    """Activations and their gradients, float32, same shape."""
    A = as_activations(A)
    G = np.asarray(G, dtype=np.float32)
    if G.shape != A.shape:
        raise ValueError(f"gradients shape {G.shape} differs from activations shape {A.shape}")
    return A, G


def spatial_axes(A: np.ndarray) -> tuple[int, ...]:
    return tuple(range(2, A.ndim))


def per_channel(w: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Channel weights (N, C) shaped to broadcast against A (N, C, *S)."""
    return w.reshape(w.shape + (1,) * (A.ndim - 2))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def weighted_sum(A, w) -> np.ndarray:
    """``relu(Σ_C w·A)``: (N, *S) float32 from activations and per-sample channel weights ``w`` (N, C)."""
    A = as_activations(A)
    w = np.asarray(w, dtype=np.float32)
    if w.shape != A.shape[:2]:
        raise ValueError(f"channel weights shape {w.shape} does not match activations (N, C) = {A.shape[:2]}")
    return relu((per_channel(w, A) * A).sum(axis=1)).astype(np.float32)
