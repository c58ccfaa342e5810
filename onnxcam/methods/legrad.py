"""LeGrad's map for one transformer block, from the gradient of that block's class score with respect to
its attention probabilities (as torchcam 0.5.0 computes it).

Gradients G (N, heads, queries, keys) → relu → mean over heads and queries → (N, keys) → the prefix
keys (class, registers) dropped → the patch keys laid on the node's grid (N, h, w). Attention values
are not multiplied in. Several blocks are averaged before one normalisation (Method.fuse_raw).

Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via Feature Formation
Sensitivity (arXiv:2404.03214).
"""
from __future__ import annotations

import numpy as np

from ..errors import OnnxcamError


def legrad(A, attention_gradients) -> np.ndarray:
    """(N, h, w) relevance of block whose tokens, mapped to (N, C, h, w), are ``A``."""
    G = np.asarray(attention_gradients, np.float32)
    if G.ndim != 4:
        raise OnnxcamError(f"LeGrad needs attention probabilities (N, heads, queries, keys); got {G.shape}")
    n, _, h, w = np.shape(A)
    relevance = np.maximum(G, 0).mean(axis=(1, 2))
    prefix = relevance.shape[1] - h * w
    if prefix < 0:
        raise OnnxcamError(f"the attention has {relevance.shape[1]} keys, fewer than the {h}x{w} patch grid")
    return np.ascontiguousarray(relevance[:, prefix:].reshape(n, h, w))
