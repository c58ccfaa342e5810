"""Layer maps from activations A and gradients G = d score / d A, both (N, C, *S) channels-first.

Formulas and constants follow pytorch-grad-cam 1.5.x (docs/methods.md). Each function returns the
map at layer resolution, (N, *S) float32, already passed through ReLU.
"""
from __future__ import annotations

import numpy as np

from ._arrays import as_activations, as_pair, per_channel, relu, spatial_axes, weighted_sum

GRADCAM_PLUS_PLUS_EPS = 1e-6
XGRADCAM_EPS = 1e-7


def cam(A, class_weights) -> np.ndarray:
    """CAM: weights are the final linear layer's row for each sample's target class, (N, C)."""
    return weighted_sum(as_activations(A), class_weights)


def gradcam(A, G) -> np.ndarray:
    """Grad-CAM: channel weight = spatial mean of the gradient."""
    A, G = as_pair(A, G)
    return weighted_sum(A, G.mean(axis=spatial_axes(G)))


def gradcam_plus_plus(A, G) -> np.ndarray:
    """Grad-CAM++ (eq. 19 of the paper with exponential scores, as pytorch-grad-cam implements it)."""
    A, G = as_pair(A, G)
    axes = spatial_axes(A)
    g2 = G ** 2
    g3 = g2 * G
    sum_a = per_channel(A.sum(axis=axes), A)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = g2 / (2 * g2 + sum_a * g3 + GRADCAM_PLUS_PLUS_EPS)
    alpha = np.where(G != 0, alpha, 0)
    return weighted_sum(A, (relu(G) * alpha).sum(axis=axes))


def xgradcam(A, G) -> np.ndarray:
    """XGrad-CAM: gradient weighted by the activation's share of its channel sum."""
    A, G = as_pair(A, G)
    axes = spatial_axes(A)
    sum_a = per_channel(A.sum(axis=axes), A)
    return weighted_sum(A, (G * A / (sum_a + XGRADCAM_EPS)).sum(axis=axes))


def hirescam(A, G) -> np.ndarray:
    """HiResCAM: element-wise gradient × activation, summed over channels (no spatial averaging)."""
    A, G = as_pair(A, G)
    return relu((G * A).sum(axis=1)).astype(np.float32)


def layercam(A, G) -> np.ndarray:
    """LayerCAM: positive gradients weight each activation element-wise."""
    A, G = as_pair(A, G)
    return relu((relu(G) * A).sum(axis=1)).astype(np.float32)
