"""EigenCAM: the activations' first principal component, no target and no gradient.

As pytorch-grad-cam's ``get_2d_projection``: per sample, NaNs become 0, A is reshaped to (prod S, C),
each column is centred, and the centred rows are projected on the first right singular vector of
``numpy.linalg.svd``. The sign of that vector is whatever LAPACK returns, exactly as in pytorch-grad-cam.

pytorch-grad-cam asks for ``full_matrices=True``, which also builds the unused square factor (positions²
or channels²: 30 s for 8 × 2048 × 7 × 7 on 2 cores). We ask for the economy SVD: the same LAPACK routine
gives bit-identical right singular vectors, sign included (tests compare both on tall, wide and square
matrices), at a fraction of the cost.

These SVDs are small and one per image; OpenBLAS spreads each over all its threads, which made them
twice as slow on two cores (a (49 × 2048) SVD: 8.2 ms on two threads, 4.5 ms on one) and left them
fighting ONNX Runtime's threads, still spinning after the run (up to 10× slower inside an explain call).
They run with BLAS limited to one thread (threadpoolctl) for the duration, whatever the process uses
elsewhere; a batch's samples are spread over ``threads`` Python threads instead (LAPACK releases the
GIL; ONNX Runtime is idle by then): each SVD is the same call on the same data, so the maps are
bit-identical, and (32 × 320 × 7 × 7) took 18 ms instead of 27 ms on two cores.
"""
from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._arrays import as_activations, relu


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:       # a dependency of onnxcam; without it the SVDs just use every BLAS thread
        return None
    return ThreadpoolController()


def one_blas_thread():
    """A context in which NumPy's BLAS/LAPACK runs on one thread (see the module docstring)."""
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


def first_component_projection(A_sample: np.ndarray) -> np.ndarray:
    """Projection of one sample's centred activations (C, *S) on their first principal axis, shape S."""
    C = A_sample.shape[0]
    rows = np.where(np.isnan(A_sample), 0, A_sample).reshape(C, -1).T
    rows = rows - rows.mean(axis=0)
    vt = np.linalg.svd(rows, full_matrices=False)[2]
    return (rows @ vt[0, :]).reshape(A_sample.shape[1:])


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def eigencam(A, threads: int | None = None) -> np.ndarray:
    """(N, *S) float32 ReLU of each sample's first-principal-component projection; the samples' SVDs
    run on up to ``threads`` threads (None: every CPU this process may use)."""
    A = as_activations(A)
    workers = min(len(A), threads or available_cpus())
    with one_blas_thread():
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="onnxcam-eigencam") as pool:
                projections = list(pool.map(first_component_projection, A))
        else:
            projections = [first_component_projection(a) for a in A]
    return relu(np.stack(projections).astype(np.float32))
