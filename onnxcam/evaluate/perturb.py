"""The perturbed inputs the faithfulness metrics score, built a batch at a time.

Deletion and insertion need ``2 * (K - 2) + 1`` perturbed copies of each input for K curve points
(the first deletion point and the last insertion point are the input itself; the all-baseline input
is deletion's last point and insertion's first). They are described as jobs (sample, curve, point,
count) and materialised ``batch_size`` at a time, so memory holds one batch of inputs whatever the
number of steps or inputs.

Arrays here are channels-first with the spatial axes flattened: (N, C, P). The mask of a job is
shared across channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import OnnxcamError

BASELINES = ("zero", "blur", "mean")
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0      # RISE's blurred substrate: an 11 x 11 Gaussian, sigma 5

DELETION, INSERTION, ALL_BASELINE = 0, 1, 2


def make_baseline(x: np.ndarray, kind: str) -> np.ndarray:
    """What removed positions become, for a channels-first batch (N, C, *S).

    zero: zeros (torchcam's default); blur: each channel blurred by an 11 x 11 Gaussian of sigma 5
    (2D inputs only); mean: each channel's spatial mean of that input."""
    if kind == "zero":
        return np.zeros_like(x)
    if kind == "mean":
        axes = tuple(range(2, x.ndim))
        return np.broadcast_to(x.mean(axis=axes, keepdims=True), x.shape).astype(x.dtype)
    if kind == "blur":
        if x.ndim != 4:
            raise OnnxcamError(f"--baseline blur needs 2D images; this input has {x.ndim - 2} spatial "
                               "axes; use --baseline zero or mean")
        out = np.empty_like(x)
        for n in range(x.shape[0]):
            for c in range(x.shape[1]):
                out[n, c] = cv2.GaussianBlur(x[n, c], (BLUR_KERNEL, BLUR_KERNEL), BLUR_SIGMA)
        return out
    raise OnnxcamError(f"unknown baseline {kind!r}; use one of {', '.join(BASELINES)}")


@dataclass(frozen=True)
class Job:
    sample: int
    curve: int          # DELETION, INSERTION or ALL_BASELINE (shared by both curves)
    point: int
    count: int          # how many top-ranked positions are perturbed


def curve_jobs(n: int, counts: np.ndarray) -> list[Job]:
    """Every perturbed input the curves of ``n`` samples need, sample by sample."""
    last = len(counts) - 1
    jobs = []
    for sample in range(n):
        jobs.append(Job(sample, ALL_BASELINE, last, int(counts[-1])))
        for point in range(1, last):
            jobs.append(Job(sample, DELETION, point, int(counts[point])))
            jobs.append(Job(sample, INSERTION, point, int(counts[point])))
    return jobs


def perturbed_batch(jobs: list[Job], x: np.ndarray, baseline: np.ndarray, ranks: np.ndarray,
                    out: np.ndarray | None = None) -> np.ndarray:
    """(len(jobs), C, P): deletion keeps the input except its top ``count`` positions; insertion
    keeps the baseline except those; the all-baseline job is the baseline. Values are copied, never
    blended, so each element is exactly the input's or the baseline's. ``out`` (reused between
    batches) saves an allocation per batch."""
    shape = (len(jobs), *x.shape[1:])
    out = np.empty(shape, x.dtype) if out is None or out.shape[0] < len(jobs) else out[:len(jobs)]
    for row, job in zip(out, jobs):
        relevant = ranks[job.sample] < job.count                         # (P,)
        keep, fill = (baseline, x) if job.curve == INSERTION else (x, baseline)
        row[...] = keep[job.sample]
        np.copyto(row, fill[job.sample], where=relevant[None, :])
    return out
