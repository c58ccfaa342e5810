"""EigenCAM: the activations' first principal component, no target and no gradient.

As pytorch-grad-cam's ``get_2d_projection``: per sample, NaNs become 0, A is reshaped to (prod S, C),
each column is centred, and the centred rows are projected on the first right singular vector of
``numpy.linalg.svd``. The sign of that vector is whatever LAPACK returns, exactly as in pytorch-grad-cam.
"""
from __future__ import annotations

import numpy as np

from ._arrays import as_activations, relu

# Above this many positions the full U matrix (positions²) of full_matrices=True would be large; the
# economy SVD computes the same right singular vectors (tests compare both on many shapes).
FULL_SVD_MAX_POSITIONS = 4096


def first_component_projection(A_sample: np.ndarray) -> np.ndarray:
    """Projection of one sample's centred activations (C, *S) on their first principal axis, shape S."""
    C = A_sample.shape[0]
    rows = np.where(np.isnan(A_sample), 0, A_sample).reshape(C, -1).T
    rows = rows - rows.mean(axis=0)
    full = rows.shape[0] <= FULL_SVD_MAX_POSITIONS
    vt = np.linalg.svd(rows, full_matrices=full)[2]
    return (rows @ vt[0, :]).reshape(A_sample.shape[1:])


def eigencam(A) -> np.ndarray:
    """(N, *S) float32 ReLU of each sample's first-principal-component projection."""
    A = as_activations(A)
    return relu(np.stack([first_component_projection(a) for a in A]).astype(np.float32))
