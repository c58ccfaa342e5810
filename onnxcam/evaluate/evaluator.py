"""Evaluator: maps from an onnxcam Explainer, then the model's own forward session scores the
perturbed inputs the metrics need, ``batch_size`` at a time.

The faithfulness metrics explain the model's top class (as torchcam does by default); the localisation
metrics explain each ground-truth class of an input (the top-class map is reused where they agree), so
loc5 is "the true class is among the top 5 and its map's box hits", as in the CAM protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import layouts
from ..errors import OnnxcamError
from ..explainer import Explainer
from . import metrics as m
from .perturb import ALL_BASELINE, BASELINES, DELETION, curve_jobs, make_baseline, perturbed_batch

FAITHFULNESS = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc")
LOCALISATION = ("pointing_game", "energy_pointing_game", "loc1", "loc5")
METRICS = FAITHFULNESS + LOCALISATION


@dataclass
class GroundTruth:
    """Boxes of one input, per class, in the map's pixel grid (x1, y1, x2, y2)."""
    boxes: dict[int, np.ndarray]


@dataclass
class SampleResult:
    """One input under one method: per-input values of the requested metrics."""
    method: str
    target: int
    probability: float
    values: dict[str, float] = field(default_factory=dict)
    fractions: np.ndarray | None = None        # (K,) perturbed fraction of each curve point
    deletion: np.ndarray | None = None         # (K,) probability of the target along deletion
    insertion: np.ndarray | None = None
    localisation_pairs: int = 0                # ground-truth classes this input was scored on
    localisation_hits: dict[str, float] = field(default_factory=dict)   # summed over those classes


class Evaluator:
    """Scores CAM methods on batches of preprocessed inputs (the model's own layout)."""

    def __init__(self, explainer: Explainer, metrics=None, steps: int = 20, baseline: str = "zero",
                 batch_size: int = 16, loc_threshold: float = 0.2, max_channels: int | None = None,
                 progress=None):
        chosen = tuple(metrics) if metrics else FAITHFULNESS
        unknown = [name for name in chosen if name not in METRICS]
        if unknown:
            raise OnnxcamError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        if steps < 1:
            raise OnnxcamError("--steps must be at least 1")
        if batch_size < 1:
            raise OnnxcamError("--batch-size must be at least 1")
        if baseline not in BASELINES:
            raise OnnxcamError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
        if not 0.0 < loc_threshold <= 1.0:
            raise OnnxcamError(f"--loc-threshold {loc_threshold} must be in (0, 1]")
        self.explainer = explainer
        self.metrics = chosen
        self.steps = steps
        self.baseline = baseline
        self.batch_size = batch_size
        self.loc_threshold = loc_threshold
        self.max_channels = max_channels
        self.progress = progress           # callable(number of inputs just scored), or None
        self.forward_rows = 0              # perturbed inputs scored so far (for the floor in benches)
        self.last_maps: np.ndarray | None = None   # the top-class maps of the last evaluate() call

    @property
    def needs_boxes(self) -> bool:
        return any(name in LOCALISATION for name in self.metrics)

    def forward_passes_per_input(self, positions: int) -> int:
        """Perturbed inputs scored per input and method (the maps' own run not counted)."""
        passes = 1 if {"average_drop", "increase_in_confidence"} & set(self.metrics) else 0
        if {"deletion_auc", "insertion_auc"} & set(self.metrics):
            passes += 2 * len(m.perturbation_counts(positions, self.steps)) - 3
        return passes

    # ---- running ------------------------------------------------------------------------------
    def evaluate(self, x, method: str, truths: list[GroundTruth | None] | None = None) -> list[SampleResult]:
        """Per-input results for ``method`` on the batch ``x`` (maps of the top class).

        ``truths``: one GroundTruth (or None) per input, for the localisation metrics. The whole of
        ``x`` and its baseline are held at once: pass batches (as ``onnxcam evaluate`` does)."""
        x = self.explainer.check_input(x)
        explanation = self.explainer.explain(x, method=method, batch_size=self.batch_size,
                                             max_channels=self.max_channels)
        if explanation.logits.ndim != 2:
            raise OnnxcamError(f"evaluate needs a classifier output (N, K); this model outputs "
                               f"{explanation.logits.shape}")
        self.last_maps = explanation.maps
        targets = explanation.targets
        p = m.softmax_probability(explanation.logits, targets)
        results = [SampleResult(explanation.method, int(t), float(q)) for t, q in zip(targets, p)]
        x_first = layouts.to_channels_first(x, self.explainer.input_layout)
        wanted = set(self.metrics)
        if {"average_drop", "increase_in_confidence"} & wanted:
            p_masked = self._probabilities(explanation.maps[:, None] * x_first, targets)
            for result, q, qm in zip(results, p, p_masked):
                if "average_drop" in wanted:
                    result.values["average_drop"] = 100.0 * float(m.drops(q, qm))
                if "increase_in_confidence" in wanted:
                    result.values["increase_in_confidence"] = 100.0 * float(m.increases(q, qm))
        if {"deletion_auc", "insertion_auc"} & wanted:
            self._curves(x_first, explanation.maps, targets, p, results)
        if self.needs_boxes and truths is not None:
            self._localise(x, explanation, truths, results)
        return results

    def _probabilities(self, batch_first: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Softmax probability of ``classes`` for channels-first inputs, ``batch_size`` per run."""
        out = np.empty(len(batch_first), np.float64)
        for lo in range(0, len(batch_first), self.batch_size):
            chunk = batch_first[lo:lo + self.batch_size]
            out[lo:lo + len(chunk)] = self._score(chunk, classes[lo:lo + len(chunk)])
        return out

    def _score(self, batch_first: np.ndarray, classes: np.ndarray) -> np.ndarray:
        batch = layouts.to_layout(np.ascontiguousarray(batch_first, np.float32), self.explainer.input_layout)
        logits = self.explainer.forward(batch)[0]
        self.forward_rows += len(batch)
        if self.progress is not None:
            self.progress(len(batch))
        return m.softmax_probability(logits, classes)

    def _curves(self, x_first, maps, targets, p, results):
        n, channels = x_first.shape[:2]
        spatial = x_first.shape[2:]
        flat_x = x_first.reshape(n, channels, -1)
        flat_base = make_baseline(x_first, self.baseline).reshape(n, channels, -1)
        positions = flat_x.shape[-1]
        counts = m.perturbation_counts(positions, self.steps)
        fractions = counts / positions
        ranks = np.stack([m.position_ranks(cam) for cam in maps])
        deletion = np.empty((n, len(counts)))
        insertion = np.empty((n, len(counts)))
        deletion[:, 0] = p
        insertion[:, -1] = p
        jobs = curve_jobs(n, counts)
        buffer = None
        for lo in range(0, len(jobs), self.batch_size):
            chunk = jobs[lo:lo + self.batch_size]
            buffer = perturbed_batch(chunk, flat_x, flat_base, ranks, buffer if lo else None)
            batch = buffer.reshape(len(chunk), channels, *spatial)
            scores = self._score(batch, targets[[job.sample for job in chunk]])
            for job, score in zip(chunk, scores):
                if job.curve == ALL_BASELINE:
                    deletion[job.sample, -1] = insertion[job.sample, 0] = score
                elif job.curve == DELETION:
                    deletion[job.sample, job.point] = score
                else:
                    insertion[job.sample, job.point] = score
        del_auc, ins_auc = m.curve_auc(deletion, fractions), m.curve_auc(insertion, fractions)
        for i, result in enumerate(results):
            result.fractions, result.deletion, result.insertion = fractions, deletion[i], insertion[i]
            if "deletion_auc" in self.metrics:
                result.values["deletion_auc"] = float(del_auc[i])
            if "insertion_auc" in self.metrics:
                result.values["insertion_auc"] = float(ins_auc[i])

    def _localise(self, x, explanation, truths, results):
        """Maps of each ground-truth class (one extra explain run for the classes that are not the
        top class), then pointing game, energy and loc1 / loc5 per (input, class)."""
        top5 = np.argsort(-explanation.logits, axis=1, kind="stable")[:, :5]
        pairs = [(i, c) for i, truth in enumerate(truths) if truth is not None for c in sorted(truth.boxes)]
        extra = [(i, c) for i, c in pairs if c != explanation.targets[i]]
        extra_maps = {}
        if extra:
            again = self.explainer.explain(x[[i for i, _ in extra]], method=explanation.method,
                                           targets=[c for _, c in extra], batch_size=self.batch_size,
                                           max_channels=self.max_channels)
            extra_maps = {pair: cam for pair, cam in zip(extra, again.maps)}
        for i, c in pairs:
            cam = extra_maps.get((i, c), explanation.maps[i])
            boxes = truths[i].boxes[c]
            found = m.localised(cam, boxes, self.loc_threshold)
            hits = {"pointing_game": float(m.pointing_hit(cam, boxes)),
                    "energy_pointing_game": m.energy_share(cam, boxes),
                    "loc1": float(found and top5[i, 0] == c), "loc5": float(found and c in top5[i])}
            result = results[i]
            result.localisation_pairs += 1
            for name, value in hits.items():
                if name in self.metrics:
                    result.localisation_hits[name] = result.localisation_hits.get(name, 0.0) + value
        for result in results:
            for name, total in result.localisation_hits.items():
                result.values[name] = total / result.localisation_pairs
