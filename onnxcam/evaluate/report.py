"""What ``onnxcam evaluate`` prints and writes: per-method totals, the table, the JSON summary, the
per-input CSV rows and the curve plots (drawn with OpenCV, no plotting library).

Totals keep running sums only (and the curves' sums and sums of squares), so a long run holds no
per-input arrays.
"""
from __future__ import annotations

import csv
import io

import cv2
import numpy as np

from .evaluator import FAITHFULNESS, LOCALISATION, METRICS, SampleResult

HEADERS = {"average_drop": "AD %", "increase_in_confidence": "IC %", "deletion_auc": "deletion",
           "insertion_auc": "insertion", "pointing_game": "pointing", "energy_pointing_game": "energy",
           "loc1": "loc1", "loc5": "loc5"}
CSV_COLUMNS = ("input", "method", "class", "probability", *METRICS)


class MethodTotals:
    """Running sums of one method's results."""

    def __init__(self, method: str):
        self.method = method
        self.n = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.pairs = 0
        self.hits: dict[str, float] = {}
        self.curves: dict[str, list] = {}     # name -> [fractions, sum, sum of squares, count]

    def add(self, result: SampleResult) -> None:
        self.n += 1
        for name in FAITHFULNESS:
            if name in result.values:
                self.sums[name] = self.sums.get(name, 0.0) + result.values[name]
                self.counts[name] = self.counts.get(name, 0) + 1
        self.pairs += result.localisation_pairs
        for name, value in result.localisation_hits.items():
            self.hits[name] = self.hits.get(name, 0.0) + value
        for name, curve in (("deletion", result.deletion), ("insertion", result.insertion)):
            if curve is None:
                continue
            acc = self.curves.get(name)
            if acc is None:
                acc = self.curves[name] = [result.fractions, np.zeros(len(curve)), np.zeros(len(curve)), 0]
            values = np.interp(acc[0], result.fractions, curve)     # same grid unless input sizes differ
            acc[1] += values
            acc[2] += values ** 2
            acc[3] += 1

    def summary(self) -> dict[str, float]:
        out = {name: self.sums[name] / self.counts[name] for name in FAITHFULNESS if self.counts.get(name)}
        if self.pairs:
            out.update({name: self.hits[name] / self.pairs for name in LOCALISATION if name in self.hits})
        return out

    def curve(self, name: str):
        """(fractions, mean, standard deviation) of the deletion or insertion curves, or None."""
        acc = self.curves.get(name)
        if acc is None:
            return None
        fractions, total, squares, count = acc
        mean = total / count
        return fractions, mean, np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))


def summary_json(model: str, n: int, totals: list[MethodTotals]) -> dict:
    return {"model": model, "n": n, "methods": {t.method: {k: round(v, 6) for k, v in t.summary().items()}
                                                  for t in totals}}


def table(totals: list[MethodTotals], n: int) -> str:
    """One row per method, one column per computed metric."""
    columns = [name for name in METRICS if any(name in t.summary() for t in totals)]
    width = max(len("method"), *(len(t.method) for t in totals))
    lines = ["  ".join([f"{'method':<{width}}", *(f"{HEADERS[c]:>9}" for c in columns)])]
    for t in totals:
        values = t.summary()
        cells = [f"{values[c]:>9.4f}" if c in values else f"{'-':>9}" for c in columns]
        lines.append("  ".join([f"{t.method:<{width}}", *cells]))
    pairs = totals[0].pairs if totals else 0
    note = f"{n} inputs" + (f", {pairs} (input, class) pairs with boxes" if pairs else "")
    return "\n".join(lines + [note])


def csv_bytes(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue().encode()


def csv_row(path, result: SampleResult) -> dict:
    return {"input": str(path), "method": result.method, "class": result.target,
            "probability": result.probability, **result.values}


# ---- plots -----------------------------------------------------------------------------------------

PANEL_W, PANEL_H, MARGIN = 420, 320, 48
MEAN_COLOUR, BAND_COLOUR = (31, 119, 180), (174, 199, 232)    # RGB


def _panel(title: str, verb: str, fractions, mean, std) -> np.ndarray:
    image = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    x0, y0, x1, y1 = MARGIN, 30, PANEL_W - 16, PANEL_H - MARGIN

    def point(f, p):
        return int(round(x0 + f * (x1 - x0))), int(round(y1 - np.clip(p, 0, 1) * (y1 - y0)))

    upper = [point(f, p) for f, p in zip(fractions, mean + std)]
    lower = [point(f, p) for f, p in zip(fractions, mean - std)]
    cv2.fillPoly(image, [np.asarray(upper + lower[::-1], np.int32)], BAND_COLOUR)
    cv2.polylines(image, [np.asarray([point(f, p) for f, p in zip(fractions, mean)], np.int32)], False,
                  MEAN_COLOUR, 2, cv2.LINE_AA)
    cv2.rectangle(image, (x0, y0), (x1, y1), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for tick in (0.0, 0.5, 1.0):
        fx, fy = point(tick, tick)
        cv2.putText(image, f"{tick:g}", (fx - 8, y1 + 16), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(image, f"{tick:g}", (x0 - 28, fy + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, f"fraction of pixels {verb}", (x0 + 90, PANEL_H - 12), font, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(image, title, (x0, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def curves_picture(totals: MethodTotals) -> np.ndarray | None:
    """Deletion and insertion panels side by side: mean probability and a +- 1 std band."""
    panels = []
    for name in ("deletion", "insertion"):
        curve = totals.curve(name)
        if curve is None:
            continue
        fractions, mean, std = curve
        auc = float(((mean[1:] + mean[:-1]) * 0.5 * np.diff(fractions)).sum())
        panels.append(_panel(f"{totals.method} {name}: mean +- std, AUC {auc:.3f} (n={totals.n})",
                             "deleted" if name == "deletion" else "inserted",
                             fractions, mean, std))
    return np.concatenate(panels, axis=1) if panels else None
