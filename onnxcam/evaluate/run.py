"""Evaluate files: what ``onnxcam evaluate`` runs. Inputs are read ``batch_size`` at a time (through
the same loader as ``onnxcam explain``), every method is scored on each batch, and only running totals
and per-input rows (a few numbers each) are kept.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OnnxcamError
from ..files import load_input
from ..preprocess import Preprocessing
from .boxes import BoxTable, ground_truth
from .evaluator import FAITHFULNESS, LOCALISATION, METRICS, Evaluator
from .report import MethodTotals, csv_row

ALIASES = {"ad": ("average_drop",), "ic": ("increase_in_confidence",), "deletion": ("deletion_auc",),
           "insertion": ("insertion_auc",), "pointing": ("pointing_game",),
           "energy": ("energy_pointing_game",), "loc": ("loc1", "loc5"), "faithfulness": FAITHFULNESS,
           "localisation": LOCALISATION, "all": METRICS}


def parse_metrics(text: str | None, have_boxes: bool) -> tuple[str, ...]:
    """--metrics LIST (names or aliases, comma separated); default: faithfulness, plus localisation
    when boxes are given."""
    if text is None:
        return FAITHFULNESS + (LOCALISATION if have_boxes else ())
    chosen: list[str] = []
    for word in (w.strip().lower() for w in text.split(",")):
        if not word:
            continue
        names = (word,) if word in METRICS else ALIASES.get(word)
        if names is None:
            raise OnnxcamError(f"--metrics: unknown metric {word!r}; choose from {', '.join(METRICS)} "
                               f"or {', '.join(ALIASES)}")
        chosen.extend(n for n in names if n not in chosen)
    if not chosen:
        raise OnnxcamError("--metrics is empty; name at least one metric, e.g. --metrics ad,ic")
    if not have_boxes and any(n in LOCALISATION for n in chosen):
        raise OnnxcamError("localisation metrics (pointing_game, energy_pointing_game, loc1, loc5) need "
                           "ground-truth boxes; pass --boxes FILE")
    return tuple(n for n in METRICS if n in chosen)


class FileEvaluation:
    """Runs ``evaluator`` for each method over files; ``totals`` and ``rows`` hold the results."""

    def __init__(self, evaluator: Evaluator, preprocessing: Preprocessing, methods: list[str],
                 boxes: BoxTable | None = None, class_names: list[str] | None = None, progress=None):
        self.evaluator = evaluator
        self.preprocessing = preprocessing
        self.methods = methods
        self.boxes = boxes
        self.class_names = class_names
        self.progress = progress                   # callable(done, total) in scored inputs
        self.totals = {method: MethodTotals(method) for method in methods}
        self.rows: list[dict] = []
        self.without_boxes = 0

    def run(self, paths: list[Path]) -> None:
        if self.boxes is not None and not any(p.name in self.boxes for p in paths):
            raise OnnxcamError("no input matches a file name in --boxes; boxes are matched by file name "
                               f"(e.g. {paths[0].name})")
        step = self.evaluator.batch_size
        done, total = 0, None

        def advance(count: int):
            nonlocal done
            done += count
            if self.progress is not None and total:
                self.progress(min(done, total), total)

        self.evaluator.progress = advance
        for lo in range(0, len(paths), step):
            chunk = paths[lo:lo + step]
            items, x = self._load(chunk)
            if total is None:
                positions = int(np.prod(self.evaluator.explainer.input_spatial(x)))
                total = len(paths) * len(self.methods) * self.evaluator.forward_passes_per_input(positions)
            truths = self._truths(items, x) if self.evaluator.needs_boxes else None
            for method in self.methods:
                for item, result in zip(items, self.evaluator.evaluate(x, method, truths)):
                    result.method = method
                    self.totals[method].add(result)
                    self.rows.append(csv_row(item.path, result))

    def _load(self, paths: list[Path]):
        explainer = self.evaluator.explainer
        items = [load_input(p, self.preprocessing, explainer.model.input.rank) for p in paths]
        shapes = {item.x.shape for item in items}
        if len(shapes) > 1:
            raise OnnxcamError(f"inputs of different shapes in one batch {sorted(shapes)}; "
                               "set --size so every image is resized alike")
        return items, np.stack([item.x for item in items])

    def _truths(self, items, x):
        explainer = self.evaluator.explainer
        map_size = explainer.input_spatial(x)
        if len(map_size) != 2:
            raise OnnxcamError("--boxes applies to 2D images; this model's input has "
                               f"{len(map_size)} spatial axes")
        num_classes = explainer.num_classes(x)
        truths = []
        for item in items:
            original = item.rgb.shape[:2] if item.rgb is not None else map_size
            truth = ground_truth(self.boxes.get(item.path.name), self.class_names, num_classes, original, map_size)
            self.without_boxes += truth is None
            truths.append(truth)
        return truths
