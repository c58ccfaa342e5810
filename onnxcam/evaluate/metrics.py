"""The metrics' arithmetic, in NumPy only: no model, no files.

Faithfulness (what the model does when the map's pixels are kept or removed) follows torchcam 0.5.0's
``ClassificationMetric`` and ``DeletionInsertionMetric`` so that numbers are comparable with it;
localisation (does the map fall on the object) follows the pointing game, Score-CAM's energy-based
pointing game and the CAM / LayerCAM loc1 / loc5 protocol. Boxes are continuous pixel coordinates
``(x1, y1, x2, y2)`` on the map's grid: pixel (row r, column c) covers [c, c+1) x [r, r+1), so it lies in
a box when its centre (c + 0.5, r + 0.5) does.
"""
from __future__ import annotations

import cv2
import numpy as np

DROP_EPS = 1e-7           # torchcam's guard in relu(p(x) - p(M x)) / (p(x) + eps)
IOU_HIT = 0.5             # loc1 / loc5: a localisation counts when IoU >= 0.5


def softmax_probability(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Softmax probability of ``classes[i]`` in row i of (N, K) logits (float64, stable)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    picked = e[np.arange(len(z)), np.asarray(classes, np.int64)]
    return picked / e.sum(axis=1)


def drops(p: np.ndarray, p_masked: np.ndarray) -> np.ndarray:
    """Per input: the relative fall in confidence when only the map's share of the input is kept."""
    return np.maximum(p - p_masked, 0.0) / (p + DROP_EPS)


def increases(p: np.ndarray, p_masked: np.ndarray) -> np.ndarray:
    """Per input: 1 when the masked input is more confident than the input, else 0."""
    return (p < p_masked).astype(np.float64)


def average_drop(p: np.ndarray, p_masked: np.ndarray) -> float:
    """Average Drop in percent (Grad-CAM++; torchcam's ``avg_drop`` times 100)."""
    return float(100.0 * drops(p, p_masked).mean())


def increase_in_confidence(p: np.ndarray, p_masked: np.ndarray) -> float:
    """Increase in Confidence in percent (torchcam's ``conf_increase`` times 100)."""
    return float(100.0 * increases(p, p_masked).mean())


def perturbation_counts(positions: int, steps: int) -> np.ndarray:
    """How many top-ranked positions each curve point perturbs: 0, s, 2s, ... then all of them,
    with s = ceil(positions / steps). The last interval may be shorter, so the fractions are the
    actual counts / positions, not a uniform grid."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    step = -(-positions // steps)
    return np.asarray([*range(0, positions, step), positions], np.int64)


def position_ranks(cam: np.ndarray) -> np.ndarray:
    """Rank of each position of a map, 0 for the highest value; ties keep their row-major order."""
    flat = np.asarray(cam).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    ranks = np.empty(flat.size, np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks


def curve_auc(curve: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Trapezoid area under (..., K) curves over the K fractions."""
    curve = np.asarray(curve, np.float64)
    widths = np.diff(np.asarray(fractions, np.float64))
    return ((curve[..., 1:] + curve[..., :-1]) * 0.5 * widths).sum(axis=-1)


# ---- localisation --------------------------------------------------------------------------------

def box_mask(shape: tuple[int, int], boxes) -> np.ndarray:
    """Boolean (H, W): pixels whose centre lies in at least one box."""
    inside = np.zeros(shape, bool)
    cols = np.arange(shape[1]) + 0.5
    rows = np.arange(shape[0]) + 0.5
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        inside |= ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
    return inside


def pointing_hit(cam: np.ndarray, boxes) -> bool:
    """The map's maximum (first one in row-major order) lies in a box. An all-zero map points nowhere."""
    cam = np.asarray(cam)
    if not cam.size or cam.max() <= 0:
        return False
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(box_mask(cam.shape, boxes)[r, c])


def energy_share(cam: np.ndarray, boxes) -> float:
    """Share of the map's total inside the boxes (0 for an all-zero map)."""
    cam = np.asarray(cam, np.float64)
    total = cam.sum()
    if total <= 0:
        return 0.0
    return float(cam[box_mask(cam.shape, boxes)].sum() / total)


def component_box(cam: np.ndarray, threshold: float) -> tuple[float, float, float, float] | None:
    """Bounding box of the largest 8-connected component of ``cam >= threshold * max(cam)``
    (lowest label on equal areas), or None for an all-zero map."""
    cam = np.asarray(cam, np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0:
        return None
    binary = (cam >= np.float32(threshold) * np.float32(peak)).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count < 2:
        return None
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top = stats[label, cv2.CC_STAT_LEFT], stats[label, cv2.CC_STAT_TOP]
    width, height = stats[label, cv2.CC_STAT_WIDTH], stats[label, cv2.CC_STAT_HEIGHT]
    return (float(left), float(top), float(left + width), float(top + height))


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def localised(cam: np.ndarray, boxes, threshold: float) -> bool:
    """The map's component box overlaps some ground-truth box with IoU >= 0.5."""
    box = component_box(cam, threshold)
    return box is not None and any(iou(box, gt) >= IOU_HIT for gt in np.asarray(boxes, float).reshape(-1, 4))
