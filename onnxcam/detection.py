"""YOLO-style detectors: read the raw head, decode boxes, run NMS in NumPy, and turn one prediction into
the score head's target weights.

Raw heads, one row per prediction ("anchor") a:

- ``yolov8`` (ultralytics YOLOv8-v11 exports): (N, 4+K, A); rows cx, cy, w, h, then K class scores.
- ``yolov5``: (N, A, 5+K); columns cx, cy, w, h, objectness, then K class probabilities; a
  prediction's confidence is objectness × class probability.

Boxes are in the model input's pixels. The explained score is one entry of the raw head, the class
score of one prediction: z[n, 4+c, a] (yolov8) or z[n, a, 5+c] (yolov5). onnxcam's score head is
``Σ z·W``, so the target is a W that is one at that entry and zero elsewhere (``head_weights``) —
passed to the Explainer as its usual (class, mask) pair for outputs with positions, read from W in
the Explainer's canonical (N, K, *positions) order (``as_targets``).

Models that run NMS inside the graph (a NonMaxSuppression node; outputs boxes, scores, classes) keep
no differentiable per-prediction score as their output: only EigenCAM (no target) runs on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OnnxcamError, shape_text

FORMATS = ("yolov8", "yolov5")


@dataclass(frozen=True)
class Detection:
    """One prediction of the raw head, after decoding (and, when listed, after NMS)."""
    prediction: int                        # its index a among the A predictions
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in model-input pixels
    class_id: int
    score: float                           # the confidence NMS ranks by

    def summary(self, scale: tuple[float, float] = (1.0, 1.0)) -> dict:
        """JSON fields; ``scale`` (sx, sy) maps input pixels to the original image's."""
        sx, sy = scale
        x1, y1, x2, y2 = self.box
        return {"prediction": self.prediction, "class": self.class_id, "confidence": round(self.score, 6),
                "box": [round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)]}


def detection_format(shape: tuple | None, requested: str = "auto") -> str:
    """``requested`` checked against the raw output's shape, or the one format the shape allows.

    YOLO heads hold far more predictions than values per prediction, so the long axis is A: (N, 4+K, A)
    with 4+K < A is yolov8, (N, A, 5+K) with A > 5+K is yolov5."""
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise OnnxcamError(f"a YOLO-style detector outputs (N, 4+K, A) or (N, A, 5+K); this model's first "
                           f"output is {shape_text(shape) if shape is not None else 'of unknown shape'}")
    rows, cols = shape[1], shape[2]
    if requested == "yolov8":
        if rows < 5:
            raise OnnxcamError(f"--detection-format yolov8 needs (N, 4+K, A) with K >= 1; got {shape_text(shape)}")
        return requested
    if requested == "yolov5":
        if cols < 6:
            raise OnnxcamError(f"--detection-format yolov5 needs (N, A, 5+K) with K >= 1; got {shape_text(shape)}")
        return requested
    if requested != "auto":
        raise OnnxcamError(f"unknown --detection-format {requested!r}; use yolov8, yolov5 or auto")
    if 5 <= rows < cols:
        return "yolov8"
    if 6 <= cols < rows:
        return "yolov5"
    raise OnnxcamError(f"cannot tell the detection format from the output {shape_text(shape)}; say "
                       "--detection-format yolov8 (N, 4+K, A) or yolov5 (N, A, 5+K)")


def looks_like_detector(shape: tuple | None) -> bool:
    """A rank-3 static output whose long axis is at least 4x the short one (and the short >= 5)."""
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return False
    short, long = sorted(shape[1:])
    return short >= 5 and long >= 4 * short


def decode(raw: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """One sample's raw head → boxes (A, 4) x1 y1 x2 y2 and per-class confidences (A, K)."""
    raw = np.asarray(raw, np.float64)
    if fmt == "yolov8":
        centres, classes = raw[:4].T, raw[4:].T
    else:
        centres, classes = raw[:, :4], raw[:, 5:] * raw[:, 4:5]
    cx, cy, w, h = centres.T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, classes


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box (4,) with each of ``boxes`` (M, 4), corners format."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.45) -> np.ndarray:
    """Greedy NMS: indices kept, by descending score (ties: lower index first); a box is dropped when
    its IoU with a kept, higher-scored box exceeds ``iou_threshold`` (as torchvision.ops.nms)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        if order.size:
            order = order[iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(keep, np.int64)


def detections(raw: np.ndarray, fmt: str, confidence: float = 0.25, iou_threshold: float = 0.45,
               max_detections: int = 300) -> list[Detection]:
    """One sample's detections after NMS, best first: each prediction's best class, confidence above
    ``confidence``, NMS within each class (ultralytics' default, class-aware)."""
    boxes, classes = decode(raw, fmt)
    best = classes.argmax(axis=1)
    score = classes[np.arange(len(classes)), best]
    candidates = np.flatnonzero(score > confidence)
    kept = []
    for c in np.unique(best[candidates]):
        members = candidates[best[candidates] == c]
        kept.extend(members[nms(boxes[members], score[members], iou_threshold)])
    kept = sorted(kept, key=lambda a: (-score[a], a))[:max_detections]
    return [Detection(int(a), tuple(float(v) for v in boxes[a]), int(best[a]), float(score[a])) for a in kept]


def choose(raw: np.ndarray, fmt: str, index: int | None = None, box=None, target: int | None = None,
           confidence: float = 0.25, iou_threshold: float = 0.45) -> Detection:
    """The prediction to explain in one sample.

    ``box`` (x1, y1, x2, y2, input pixels): the prediction whose decoded box has the best IoU with it
    (ties: the higher confidence of the class), among every prediction, before NMS. Else the
    ``index``-th detection after NMS (0 = best; default 0), of class ``target`` only when given. The
    class explained is ``target`` when given, else the prediction's best class."""
    boxes, classes = decode(raw, fmt)
    num_classes = classes.shape[1]
    if target is not None and not 0 <= target < num_classes:
        raise OnnxcamError(f"--target {target} is out of range: the detector has {num_classes} classes "
                           f"(0-{num_classes - 1})")
    if box is not None:
        overlap = iou(np.asarray(box, np.float64), boxes)
        ranking = classes[:, target] if target is not None else classes.max(axis=1)
        a = int(np.lexsort((-ranking, -overlap))[0])
        c = int(target if target is not None else classes[a].argmax())
        return Detection(a, tuple(float(v) for v in boxes[a]), c, float(classes[a, c]))
    found = detections(raw, fmt, confidence, iou_threshold)
    if target is not None:
        found = [d for d in found if d.class_id == target]
    k = 0 if index is None else index
    if k < 0:
        raise OnnxcamError("--detection must be 0 or more (0 = the highest-scored detection)")
    if k >= len(found):
        what = f" of class {target}" if target is not None else ""
        raise OnnxcamError(f"--detection {k} asks for detection #{k}{what} but only {len(found)} remain "
                           f"after NMS at confidence > {confidence}; lower --confidence or pick a smaller "
                           "index (or give --box)")
    return found[k]


def head_weights(chosen: list[Detection], fmt: str, shape: tuple) -> np.ndarray:
    """W for a raw head of ``shape`` (N, ·, ·) in its own axis order: per sample one at the chosen
    prediction's class score, z[n, 4+c, a] (yolov8) or z[n, a, 5+c] (yolov5), zero elsewhere."""
    weights = np.zeros(shape, np.float32)
    for n, found in enumerate(chosen):
        if fmt == "yolov8":
            weights[n, 4 + found.class_id, found.prediction] = 1.0
        else:
            weights[n, found.prediction, 5 + found.class_id] = 1.0
    return weights


def as_targets(canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-hot W in the Explainer's canonical order (N, K, *positions) → its (targets, target_mask):
    per sample the class row holding the one, and that row as the mask over positions."""
    n = canonical.shape[0]
    rows = canonical.reshape(n, canonical.shape[1], -1).any(axis=2)
    targets = rows.argmax(axis=1).astype(np.int64)
    return targets, np.ascontiguousarray(canonical[np.arange(n), targets])


def nms_node(view) -> str | None:
    """The name of a NonMaxSuppression node in the graph (NMS exported inside the model), else None."""
    for node in view.graph.node:
        if node.op_type == "NonMaxSuppression":
            return node.name or node.output[0]
    return None


def nms_inside_message(node: str) -> str:
    return (f"this detector runs NMS inside the graph (node {node}), so its outputs are the boxes kept, "
            "not a per-prediction score to differentiate: use --method eigencam (no target), or export "
            "the raw head (N, 4+K, A) / (N, A, 5+K) as the first output (ultralytics: nms=False) to "
            "explain one detection with the gradient methods and Score-CAM")


def draw_detection(image: np.ndarray, box, label: str) -> np.ndarray:
    """The overlay with the explained box and its class drawn on (box in this image's pixels)."""
    import cv2
    picture = np.ascontiguousarray(image.copy())
    h, w = picture.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = (min(max(v, 0), w - 1) for v in (x1, x2))
    y1, y2 = (min(max(v, 0), h - 1) for v in (y1, y2))
    thickness = max(1, round(min(h, w) / 200))
    cv2.rectangle(picture, (x1, y1), (x2, y2), (255, 255, 255), thickness + 2, cv2.LINE_AA)
    cv2.rectangle(picture, (x1, y1), (x2, y2), (0, 200, 0), thickness, cv2.LINE_AA)
    scale = max(0.4, min(h, w) / 600)
    (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    top = y1 - th - base - 4 if y1 - th - base - 4 >= 0 else min(y1 + 1, h - th - base - 4)
    cv2.rectangle(picture, (x1, top), (min(x1 + tw + 6, w - 1), top + th + base + 4), (0, 200, 0), -1)
    cv2.putText(picture, label, (x1 + 3, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)
    return picture
