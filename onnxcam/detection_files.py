"""``onnxcam explain`` on a YOLO-style detector: per image, pick the prediction to explain (``--detection
K``, ``--box``, ``--target``), explain its class score, draw the box and class on the overlay and
report the box. File handling (batches, skipping, atomic writes, grids) is FileExplainer's."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from . import detection
from .errors import OnnxcamError
from .explainer import Explanation
from .files import FileExplainer, FileResult, InputItem


@dataclass
class DetectionResult(FileResult):
    detection: dict | None = None              # the explained prediction (box in image pixels)

    def summary(self) -> dict:
        found = {**super().summary(), "detection": self.detection}
        if np.isnan(self.score):          # EigenCAM scores nothing; JSON has no NaN
            found["score"] = None
        return found


class DetectionFileExplainer(FileExplainer):
    """FileExplainer for detectors. ``fmt``: yolov8 / yolov5 / auto; ``detection_index`` the K-th
    detection after NMS (0 = best); ``box`` (x1, y1, x2, y2) in image pixels; ``target`` forces the
    class. EigenCAM needs no prediction; on models with NMS inside the graph it is the only method."""

    def __init__(self, *args, fmt: str = "auto", detection_index: int | None = None, box=None,
                 confidence: float = 0.25, iou_threshold: float = 0.45, **kwargs):
        super().__init__(*args, **kwargs)
        if self.top_k is not None:
            raise OnnxcamError("--top-k does not apply to detectors; pick a box with --detection K or --box")
        if self.target_mask is not None:
            raise OnnxcamError("--target-mask does not apply to detectors; pick a box with --detection K or --box")
        inside = detection.nms_node(self.explainer.model.view)
        self.needs_prediction = any(method != "eigencam" for method in self.methods)
        if inside is not None and self.needs_prediction:
            raise OnnxcamError(detection.nms_inside_message(inside))
        self.fmt = fmt
        self.detection_index, self.box = detection_index, box
        self.confidence, self.iou_threshold = confidence, iou_threshold
        self._chosen: list[detection.Detection | None] = []
        self._scales: list[tuple[float, float]] = []

    def _scale(self, item: InputItem, x: np.ndarray) -> tuple[float, float]:
        """(sx, sy): model-input pixels → the original image's pixels (the preprocessing stretches)."""
        if item.rgb is None:
            return 1.0, 1.0
        height, width = self.explainer.input_spatial(x)
        return item.rgb.shape[1] / width, item.rgb.shape[0] / height

    def _explain_batch(self, items: list[InputItem], x: np.ndarray, protected: set[Path]):
        self._scales = [self._scale(item, x) for item in items]
        self._chosen = [None] * len(items)
        targets = masks = None
        if self.needs_prediction:
            scored = self.explainer.scored_output(x)
            raw = scored.own(self.explainer.forward(x)[0])          # the head in its own axis order
            fmt = detection.detection_format(raw.shape, self.fmt)
            for i, (sx, sy) in enumerate(self._scales):
                box = None if self.box is None else (self.box[0] / sx, self.box[1] / sy,
                                                     self.box[2] / sx, self.box[3] / sy)
                self._chosen[i] = detection.choose(raw[i], fmt, self.detection_index, box, self.target,
                                                   self.confidence, self.iou_threshold)
            targets, masks = detection.as_targets(scored.canonical(detection.head_weights(self._chosen, fmt,
                                                                                          raw.shape)))
        explanations: dict[str, Explanation] = {}
        for method in self.methods:
            scored = method != "eigencam"
            explanations[method] = self.explainer.explain(
                x, method=method, targets=targets if scored else None, target_mask=masks if scored else None,
                batch_size=self.batch_size, max_channels=self.max_channels, progress=self.progress)
        for i, item in enumerate(items):
            yield from self._write(item, i, explanations, 1, None, protected)

    def _picture(self, item: InputItem, i: int, method: str, cam: np.ndarray) -> np.ndarray:
        picture = super()._picture(item, i, method, cam)
        found = self._chosen[i]
        if found is None or item.rgb is None:
            return picture
        sx, sy = self._scales[i]
        x1, y1, x2, y2 = found.box
        name = self.class_name(found.class_id) or f"class {found.class_id}"
        return detection.draw_detection(picture, (x1 * sx, y1 * sy, x2 * sx, y2 * sy),
                                        f"{name} {found.score:.2f}")

    def _result(self, item, i, method, explanation, rank, written) -> FileResult:
        result = super()._result(item, i, method, explanation, rank, written)
        found = self._chosen[i]
        values = {f.name: getattr(result, f.name) for f in fields(FileResult)}
        if found is None:
            values.update(target=-1, class_name=None, score=float("nan"))
        else:
            values.update(target=found.class_id, class_name=self.class_name(found.class_id))
        if method == "eigencam":
            values["score"] = float("nan")
        return DetectionResult(**values, detection=None if found is None else found.summary(self._scales[i]))


def file_runner(explainer, preprocessing, out_dir, methods, detection: dict | None = None,
                **file_options) -> FileExplainer:
    """The single-process writer both engines use: ``DetectionFileExplainer`` with the ``detection``
    options (fmt, detection_index, box, confidence, iou_threshold) for a detector, else ``FileExplainer``."""
    if detection is None:
        return FileExplainer(explainer, preprocessing, out_dir, methods, **file_options)
    return DetectionFileExplainer(explainer, preprocessing, out_dir, methods, **detection, **file_options)

