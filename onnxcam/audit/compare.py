"""Run one Explainer per model over the same inputs and measure how far each candidate drifts from the
reference: predictions (top-1, top-5, probabilities) and maps (compared at the reference's input
resolution, so different input sizes and layouts compare too).

Each model reads the same files through its own preprocessing; ``.npy`` inputs are given in the
reference's layout and moved into each model's. With the ``reference`` target policy every model
explains the reference's top-1 class, so a candidate that changed its mind is still asked about the
same evidence; with ``own`` each explains its own top-1.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import layouts
from ..errors import OnnxcamError
from ..explainer import Explainer
from ..files import InputItem, load_input
from ..methods.postprocess import resize
from ..preprocess import Preprocessing
from . import measures

TARGET_POLICIES = ("reference", "own")


@dataclass
class AuditedModel:
    """One model of the comparison: a label for tables, its explainer and its preprocessing."""
    label: str
    explainer: Explainer
    preprocessing: Preprocessing

    @property
    def nodes(self) -> list[str]:
        return [node.name for node in self.explainer.nodes]


@dataclass
class Prediction:
    """What one model said about one input."""
    top1: int
    target: int              # the class its map explains
    probability: float       # softmax probability of its top-1
    class_name: str | None
    deletion_auc: float | None = None     # with deletion: AUC of its own top-1's deletion curve

    def summary(self) -> dict:
        extra = {} if self.deletion_auc is None else {"deletion_auc": _round(self.deletion_auc)}
        return {"top1": self.top1, "class_name": self.class_name, "target": self.target,
                "probability": _round(self.probability), **extra}


@dataclass
class InputComparison:
    """One input: every model's prediction and map, and the measures of each candidate vs the reference."""
    item: InputItem
    predictions: list[Prediction]
    maps: list[np.ndarray]                  # per model, at the reference's input resolution
    pairs: list[dict[str, float]]           # per candidate (models[1:]), measures.PER_INPUT keys

    @property
    def path(self) -> Path:
        return self.item.path

    @property
    def worst_pearson(self) -> float:
        return min(p["pearson"] for p in self.pairs)

    def measures_only(self) -> "InputComparison":
        """This comparison without its arrays (what the summaries and JSON need)."""
        return InputComparison(InputItem(self.item.path, np.zeros((0,), np.float32), None),
                               self.predictions, [], self.pairs)

    def sort_key(self) -> tuple:
        """Worst first: the lowest map correlation over the pairs, then the fewest agreeing top-1s."""
        return (self.worst_pearson, sum(p["top1_agreement"] for p in self.pairs), str(self.path))


def _model_inputs(model: AuditedModel, reference: AuditedModel, items: list[InputItem]) -> np.ndarray:
    """The batch for ``model``: photos through its preprocessing, arrays moved into its layout."""
    arrays = []
    for item in items:
        if item.rgb is not None:
            arrays.append(model.preprocessing.apply(item.rgb))
        else:
            x = layouts.to_channels_first(item.x[None], reference.explainer.input_layout)
            arrays.append(layouts.to_layout(x, model.explainer.input_layout)[0])
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise OnnxcamError(f"inputs of different shapes {sorted(shapes)} for {model.label}; give that "
                           "model a fixed size (--preprocess size=H,W)")
    return np.stack(arrays)


def _at(maps: np.ndarray, shape: tuple, label: str) -> np.ndarray:
    if maps.shape[1:] == shape:
        return maps
    if maps.ndim - 1 != len(shape):
        raise OnnxcamError(f"{label} gives maps of shape {maps.shape[1:]} but the reference {shape}; "
                           "compare models with the same number of spatial axes")
    return resize(maps, shape)


def _prediction(logits: np.ndarray, target: int, model: AuditedModel) -> Prediction:
    top1 = int(np.argmax(logits))
    names = model.explainer.model.class_names
    probability = float(measures.softmax(logits)[top1])
    return Prediction(top1, int(target), probability, names[top1] if names and top1 < len(names) else None)


def _deletion_aucs(evaluators, model_inputs: list[np.ndarray], method: str) -> list[np.ndarray] | None:
    """Per model, the deletion AUC of each input (onnxcam.evaluate: each model's own top-1 map, the
    target's probability as the map's most relevant pixels are removed; lower is more faithful)."""
    if evaluators is None:
        return None
    return [np.array([r.values["deletion_auc"] for r in evaluator.evaluate(x, method)])
            for evaluator, x in zip(evaluators, model_inputs)]


def run_comparison(models: list[AuditedModel], paths: list[Path], method: str = "gradcam",
                   target_policy: str = "reference", batch_size: int = 16, max_channels: int | None = None,
                   progress=None, batch_progress=None, deletion: bool = False) -> Iterator[InputComparison]:
    """Yield one InputComparison per input, batch by batch (the caller keeps what it needs).

    ``deletion``: also each model's deletion AUC and, per pair, their absolute difference."""
    if len(models) < 2:
        raise OnnxcamError("compare needs a reference model and at least one candidate (.onnx files)")
    if target_policy not in TARGET_POLICIES:
        raise OnnxcamError(f"unknown target policy {target_policy!r}; use reference or own")
    reference = models[0]
    rank = reference.explainer.model.input.rank
    evaluators = None
    if deletion:
        from ..evaluate import Evaluator
        evaluators = [Evaluator(m.explainer, metrics=["deletion_auc"], batch_size=batch_size,
                                max_channels=max_channels) for m in models]
    for lo in range(0, len(paths), batch_size):
        items = [load_input(p, reference.preprocessing, rank) for p in paths[lo:lo + batch_size]]
        explanations, targets, inputs = [], None, []
        for model in models:
            x = _model_inputs(model, reference, items)
            inputs.append(x)
            explanation = model.explainer.explain(x, method=method, targets=targets, batch_size=batch_size,
                                                  max_channels=max_channels, progress=progress)
            if explanation.logits.ndim != 2:
                raise OnnxcamError(f"{model.label} outputs {explanation.logits.shape[1:]} per input; compare "
                                   "audits classifiers, whose output is one score per class")
            if target_policy == "reference" and targets is None:
                targets = explanation.targets
            explanations.append(explanation)
        shape = explanations[0].maps.shape[1:]
        maps = [_at(e.maps, shape, m.label) for e, m in zip(explanations, models)]
        pair_rows = []
        for e, model in zip(explanations[1:], models[1:]):
            try:
                pair_rows.append(measures.prediction_measures(explanations[0].logits, e.logits))
            except ValueError as exc:
                raise OnnxcamError(f"cannot compare {model.label} with {reference.label}: {exc}; compare "
                                   "models with the same classes") from exc
        aucs = _deletion_aucs(evaluators, inputs, method)
        for i, item in enumerate(items):
            predictions = [_prediction(e.logits[i], e.targets[i], m) for e, m in zip(explanations, models)]
            pairs = []
            for c, row in enumerate(pair_rows, start=1):
                values = {key: float(v[i]) for key, v in row.items()}
                values.update(measures.map_measures(maps[0][i], maps[c][i]))
                if aucs is not None:
                    values["deletion_auc_diff"] = abs(float(aucs[c][i] - aucs[0][i]))
                pairs.append(values)
            if aucs is not None:
                for prediction, auc in zip(predictions, aucs):
                    prediction.deletion_auc = float(auc[i])
            yield InputComparison(item, predictions, [m[i] for m in maps], pairs)
        if batch_progress is not None:
            batch_progress(min(lo + batch_size, len(paths)), len(paths))


def _round(value: float) -> float:
    """8 significant digits: short JSON that still shows a drift of 1e-7."""
    return float(f"{value:.8g}")


# ---- summary per pair, thresholds -----------------------------------------------------------------
OPTIONAL = {"deletion_auc_diff": False}      # per-input measures only some runs take (--deletion)


def summary_keys(optional: bool = True) -> dict[str, bool]:
    """Every key a pair's summary holds -> True where higher means more agreement."""
    keys = {"top1_agreement": True, "prob_max_abs": False}
    for name, higher in {**measures.PER_INPUT, **(OPTIONAL if optional else {})}.items():
        keys[f"{name}_mean"] = higher
        keys[f"{name}_min" if higher else f"{name}_max"] = higher
    keys.pop("top1_agreement_mean")
    keys.pop("top1_agreement_min")
    keys.pop("prob_max_abs_max")
    return keys


def parse_thresholds(texts: tuple[str, ...] | list[str], higher_is_better: bool, flag: str) -> dict[str, float]:
    """``KEY=VALUE,KEY=VALUE`` (repeatable) -> {key: value}, every key checked against summary_keys()."""
    keys = summary_keys()
    wanted = {k for k, higher in keys.items() if higher == higher_is_better}
    other = "--fail-over" if higher_is_better else "--fail-under"
    thresholds = {}
    for text in texts:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            try:
                number = float(value)
            except ValueError:
                number = None
            if not sep or number is None:
                raise OnnxcamError(f"{flag} {part!r} must be KEY=NUMBER, e.g. pearson_min=0.9")
            if key not in keys:
                raise OnnxcamError(f"{flag}: unknown measure {key!r}; use one of {', '.join(sorted(wanted))}")
            if key not in wanted:
                raise OnnxcamError(f"{flag}: {key} is a drift (lower is better); gate it with {other}")
            thresholds[key] = number
    return thresholds


@dataclass
class PairSummary:
    reference: str
    candidate: str
    values: dict[str, float]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate,
                **{k: _round(v) for k, v in self.values.items()}, "pass": self.passed,
                "failures": self.failures}


def summarize(models: list[AuditedModel], inputs: list[InputComparison], fail_under: dict[str, float],
              fail_over: dict[str, float]) -> list[PairSummary]:
    """One PairSummary per candidate: means, minima / maxima over the inputs, checked against the gates."""
    if not inputs:
        raise OnnxcamError("no input to compare; pass image files, folders or .npy arrays")
    summaries = []
    for c, model in enumerate(models[1:]):
        column = {name: np.array([i.pairs[c][name] for i in inputs]) for name in inputs[0].pairs[c]}
        values = {}
        for key in summary_keys():
            name, _, stat = key.rpartition("_")
            if key not in ("top1_agreement", "prob_max_abs") and name not in column:
                continue
            if key == "top1_agreement":
                values[key] = float(column[key].mean())
            elif key == "prob_max_abs":
                values[key] = float(column[key].max())
            else:
                values[key] = float(getattr(np, stat)(column[name]))
        missing = [k for k in (*fail_under, *fail_over) if k not in values]
        if missing:
            raise OnnxcamError(f"no {missing[0]} to gate: run with --deletion to measure deletion AUC")
        failures = [f"{k} {values[k]:.6g} < {v:g}" for k, v in fail_under.items() if values[k] < v]
        failures += [f"{k} {values[k]:.6g} > {v:g}" for k, v in fail_over.items() if values[k] > v]
        summaries.append(PairSummary(models[0].label, model.label, values, failures))
    return summaries


def report_json(models: list[AuditedModel], inputs: list[InputComparison], pairs: list[PairSummary],
                method: str, target_policy: str) -> dict:
    """The --json document: models, n, pairs (one per candidate) and inputs (worst first)."""
    ordered = sorted(inputs, key=InputComparison.sort_key)
    return {
        "models": [m.label for m in models], "method": method, "target_policy": target_policy,
        "nodes": {m.label: m.nodes for m in models}, "n": len(inputs),
        "pairs": [p.summary() for p in pairs],
        "inputs": [{"input": str(i.path),
                    "predictions": {m.label: p.summary() for m, p in zip(models, i.predictions)},
                    "pairs": [{"candidate": m.label, **{k: _round(v) for k, v in row.items()}}
                              for m, row in zip(models[1:], i.pairs)]} for i in ordered],
    }


def summary_text(document: dict, models: list[AuditedModel]) -> str:
    """The summary a person reads: one block per candidate, worst input named."""
    lines = [f"reference {models[0].label} (node {', '.join(models[0].nodes)}); {document['method']}, "
             f"target policy {document['target_policy']}, {document['n']} input(s)"]
    for c, pair in enumerate(document["pairs"]):
        verdict = "pass" if pair["pass"] else "FAIL (" + "; ".join(pair["failures"]) + ")"
        lines.append(f"candidate {pair['candidate']} (node {', '.join(models[c + 1].nodes)}): {verdict}")
        lines.append(f"  predictions  top1_agreement {pair['top1_agreement']:.4f}  top5_overlap_mean "
                     f"{pair['top5_overlap_mean']:.4f}  prob_max_abs {pair['prob_max_abs']:.3g}  "
                     f"kl_mean {pair['kl_mean']:.3g}")
        lines.append(f"  maps         pearson mean {pair['pearson_mean']:.6f} min {pair['pearson_min']:.6f}  "
                     f"spearman mean {pair['spearman_mean']:.6f} min {pair['spearman_min']:.6f}")
        lines.append(f"               iou_top20 mean {pair['iou_top20_mean']:.4f} min {pair['iou_top20_min']:.4f}  "
                     f"peak_distance mean {pair['peak_distance_mean']:.4f} max {pair['peak_distance_max']:.4f}")
        if "deletion_auc_diff_mean" in pair:
            lines.append(f"  deletion     auc_diff mean {pair['deletion_auc_diff_mean']:.4f} "
                         f"max {pair['deletion_auc_diff_max']:.4f}")
        worst = min(document["inputs"], key=lambda i: i["pairs"][c]["pearson"])
        lines.append(f"  worst input  {worst['input']} (pearson {worst['pairs'][c]['pearson']:.6f})")
    return "\n".join(lines)
