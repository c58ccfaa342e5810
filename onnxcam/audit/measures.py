"""Agreement measures between two models' predictions and maps, pure NumPy, one input at a time.

Predictions: top-1 agreement, top-k overlap, and the drift of the softmax probabilities (largest
absolute difference, KL divergence of the candidate from the reference). Maps (same shape, any rank):
Pearson and Spearman correlation, IoU of the top-20 % regions, and the distance between the two peaks
as a fraction of the map's diagonal.

Degenerate maps get defined values, never NaN, so a summary over many inputs stays a number:
correlation of two constant maps is 1 (nothing to disagree about), of one constant map with a varying
one 0; the top region of a map holds every pixel at or above its k-th largest value (ties included), so
a constant map's region is the whole map.
"""
from __future__ import annotations

import math

import numpy as np

TOP_FRACTION = 0.2


# ---- predictions ------------------------------------------------------------------------------
def log_softmax(logits) -> np.ndarray:
    """log softmax over the last axis, in float64 (stable: the max is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits) -> np.ndarray:
    return np.exp(log_softmax(logits))


def top_k(logits, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, largest first (ties: the lower index first)."""
    logits = np.asarray(logits)
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


def top1_agreement(reference_logits, candidate_logits) -> np.ndarray:
    """Per row: 1.0 where both arg-max classes are the same, else 0.0."""
    return (top_k(reference_logits, 1)[..., 0] == top_k(candidate_logits, 1)[..., 0]).astype(np.float64)


def top_k_overlap(reference_logits, candidate_logits, k: int = 5) -> np.ndarray:
    """Per row: the share of the reference's k top classes that are also among the candidate's."""
    k = min(k, np.shape(reference_logits)[-1], np.shape(candidate_logits)[-1])
    ref, cand = top_k(reference_logits, k), top_k(candidate_logits, k)
    return np.array([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref, cand)])


def probability_max_abs(reference_logits, candidate_logits) -> np.ndarray:
    """Per row: max over classes of |softmax(reference) - softmax(candidate)|."""
    return np.abs(softmax(reference_logits) - softmax(candidate_logits)).max(axis=-1)


def kl_divergence(reference_logits, candidate_logits) -> np.ndarray:
    """Per row: KL(p_reference || p_candidate) in nats, from log-softmax (no epsilon needed)."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(candidate_logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)


# ---- maps -------------------------------------------------------------------------------------
def _flat(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def pearson(a, b) -> float:
    """Pearson correlation of two maps of the same shape (1 for two constant maps, 0 for one)."""
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"maps of different sizes {np.shape(a)} and {np.shape(b)}")
    x, y = x - x.mean(), y - y.mean()
    sx, sy = math.sqrt(float(x @ x)), math.sqrt(float(y @ y))
    if sx == 0.0 and sy == 0.0:
        return 1.0
    if sx == 0.0 or sy == 0.0:
        return 0.0
    return float(np.clip((x @ y) / (sx * sy), -1.0, 1.0))


def rank_data(a) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties sharing the mean of their ranks."""
    x = _flat(a)
    order = np.argsort(x, kind="stable")
    ordinal = np.empty(x.size, np.float64)
    ordinal[order] = np.arange(1, x.size + 1)
    _, groups = np.unique(x, return_inverse=True)
    sums = np.bincount(groups, weights=ordinal)
    counts = np.bincount(groups)
    return sums[groups] / counts[groups]


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks."""
    return pearson(rank_data(a), rank_data(b))


def top_region(a, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Boolean mask of the pixels at or above the map's k-th largest value, k = ceil(fraction * n)."""
    x = np.asarray(a, dtype=np.float64)
    k = max(1, math.ceil(fraction * x.size))
    threshold = np.partition(x.ravel(), x.size - k)[x.size - k]
    return x >= threshold


def iou_top(a, b, fraction: float = TOP_FRACTION) -> float:
    """Intersection over union of the two maps' top regions."""
    ra, rb = top_region(a, fraction), top_region(b, fraction)
    if ra.shape != rb.shape:
        raise ValueError(f"maps of different sizes {ra.shape} and {rb.shape}")
    return float(np.logical_and(ra, rb).sum() / np.logical_or(ra, rb).sum())


def peak_distance(a, b) -> float:
    """Distance between the two maps' maxima (first in C order) over the diagonal, in [0, 1]:
    1 means opposite corners. The diagonal runs between the centres of the corner pixels."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"maps of different sizes {a.shape} and {b.shape}")
    pa = np.array(np.unravel_index(int(np.argmax(a)), a.shape), np.float64)
    pb = np.array(np.unravel_index(int(np.argmax(b)), b.shape), np.float64)
    diagonal = math.sqrt(sum((s - 1) ** 2 for s in a.shape))
    return 0.0 if diagonal == 0.0 else float(np.linalg.norm(pa - pb) / diagonal)


# ---- one input, all measures ------------------------------------------------------------------
# name -> True where higher means more agreement (what --fail-under gates), False for drifts
PER_INPUT = {
    "top1_agreement": True, "top5_overlap": True, "prob_max_abs": False, "kl": False,
    "pearson": True, "spearman": True, "iou_top20": True, "peak_distance": False,
}


def prediction_measures(reference_logits, candidate_logits) -> dict[str, np.ndarray]:
    """Per-row prediction measures for two (N, K) logit arrays."""
    ref, cand = np.asarray(reference_logits), np.asarray(candidate_logits)
    if ref.shape[-1] != cand.shape[-1]:
        raise ValueError(f"the models score {ref.shape[-1]} and {cand.shape[-1]} classes")
    return {"top1_agreement": top1_agreement(ref, cand), "top5_overlap": top_k_overlap(ref, cand, 5),
            "prob_max_abs": probability_max_abs(ref, cand), "kl": kl_divergence(ref, cand)}


def map_measures(reference_map, candidate_map) -> dict[str, float]:
    return {"pearson": pearson(reference_map, candidate_map),
            "spearman": spearman(reference_map, candidate_map),
            "iou_top20": iou_top(reference_map, candidate_map),
            "peak_distance": peak_distance(reference_map, candidate_map)}
