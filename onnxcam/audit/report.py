"""The audit as pictures: per input, the overlays of every model side by side with the candidates'
difference maps, as PNG panels (``--out``) or as one self-contained HTML file (``--html``).

The HTML page embeds its images as base64 PNG and draws its histograms as inline SVG; it loads nothing
from the network and runs no script, so it opens the same in any browser, offline, years later.
"""
from __future__ import annotations

import base64
import html

import cv2
import numpy as np

from .. import outputs, render
from ..files import InputItem, draw
from .compare import AuditedModel, InputComparison, PairSummary

THUMBNAIL_SIDE = 160
HISTOGRAM_MEASURES = ("pearson", "spearman", "iou_top20", "peak_distance", "prob_max_abs", "kl",
                      "deletion_auc_diff")
TABLE_KEYS = ("top1_agreement", "top5_overlap_mean", "prob_max_abs", "kl_mean", "pearson_mean",
              "pearson_min", "spearman_mean", "iou_top20_mean", "peak_distance_max", "deletion_auc_diff_mean",
              "deletion_auc_diff_max")


def diverging(diff: np.ndarray) -> np.ndarray:
    """RGB uint8 of a map difference in [-1, 1]: white at 0, red where the candidate is hotter, blue
    where the reference is."""
    d = np.clip(np.asarray(diff, np.float32), -1.0, 1.0)
    fade = 255.0 * (1.0 - np.abs(d))
    red = np.where(d < 0, fade, 255.0)
    blue = np.where(d > 0, fade, 255.0)
    return np.uint8(np.rint(np.stack([red, fade, blue], axis=-1)))


def _thumbnail(item: InputItem, side: int) -> InputItem:
    if item.rgb is None:
        return item
    h, w = item.rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1.0:
        return item
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return InputItem(item.path, item.x, cv2.resize(item.rgb, size, interpolation=cv2.INTER_AREA))


def _difference_picture(item: InputItem, diff: np.ndarray) -> np.ndarray:
    if diff.ndim == 2:
        if item.rgb is not None:
            h, w = item.rgb.shape[:2]
        else:
            h = w = render.render_map(item.x, np.zeros_like(diff)).shape[0]
        return diverging(cv2.resize(diff.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR))
    return render.render_map(item.x, np.abs(diff))         # 1D / 3D: |difference| in the usual plot


def input_panels(comparison: InputComparison, models: list[AuditedModel], alpha: float = 0.5,
                 side: int | None = THUMBNAIL_SIDE) -> list[tuple[str, np.ndarray]]:
    """(caption, RGB picture) for the input, each model's overlay, then each candidate's difference."""
    item = _thumbnail(comparison.item, side) if side else comparison.item
    source = item.rgb if item.rgb is not None else render.render_input(item.x)
    panels = [("input", source)]
    for model, prediction, cam in zip(models, comparison.predictions, comparison.maps):
        name = prediction.class_name or f"class {prediction.top1}"
        panels.append((f"{_short(model.label)}: {name} {prediction.probability:.2f}", draw(item, cam, alpha)))
    for c, model in enumerate(models[1:], start=1):
        diff = comparison.maps[c] - comparison.maps[0]
        panels.append((f"{_short(model.label)} - reference, max |d| {float(np.abs(diff).max()):.2g}",
                       _difference_picture(item, diff)))
    return panels


def compact(comparison: InputComparison, side: int = THUMBNAIL_SIDE) -> InputComparison:
    """The same comparison holding only what the HTML page shows: a thumbnail of the photo and maps no
    larger than it (the measures were taken at full resolution before), so a long run fits in memory."""
    item = _thumbnail(comparison.item, side)
    if item.rgb is not None:
        item = InputItem(item.path, np.zeros((0,), np.float32), item.rgb)
    maps = comparison.maps
    if item.rgb is not None and maps and maps[0].ndim == 2 and max(maps[0].shape) > side:
        h, w = maps[0].shape
        size = (max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w))))
        maps = [cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA) for m in maps]
    return InputComparison(item, comparison.predictions, maps, comparison.pairs)


def panel_grid(panels: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """All panels of one input in one labelled row (the --out PNG)."""
    height = max(p.shape[0] for _, p in panels)
    width = max(p.shape[1] for _, p in panels)
    padded = []
    for caption, picture in panels:
        canvas = np.full((height, width, 3), 255, np.uint8)
        canvas[:picture.shape[0], :picture.shape[1]] = picture
        padded.append(render.label_panel(canvas, caption))
    return render.grid(padded, columns=len(padded))


# ---- HTML ---------------------------------------------------------------------------------------
def _short(label: str) -> str:
    """The file name of a model label (captions stay short; the full path is in the models table)."""
    return label.replace("\\", "/").rsplit("/", 1)[-1]


def _range_text(lo: float, hi: float) -> tuple[str, str]:
    """lo and hi with just enough digits (up to 6) to tell them apart; closer than that, hi as lo + d."""
    for digits in range(4, 7):
        a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
        if a != b:
            return a, b
    return f"{lo:.6g}", f"+{hi - lo:.1e}" if hi > lo else f"{hi:.6g}"


def _png_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(outputs.png_bytes(rgb)).decode("ascii")


def histogram_svg(values, title: str, bins: int = 20, width: int = 168, height: int = 76) -> str:
    """An inline SVG histogram of ``values`` over their own range (one bar when they are all equal)."""
    values = np.asarray(values, np.float64)
    lo, hi = float(values.min()), float(values.max())
    top, bottom = 18, height - 18
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        counts, edges = np.array([values.size]), np.array([lo, hi])
    else:
        counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    bar = width / len(counts)
    rects = []
    for i, count in enumerate(counts):
        h = (bottom - top) * count / counts.max()
        rects.append(f'<rect x="{i * bar:.2f}" y="{bottom - h:.2f}" width="{max(bar - 1, 1):.2f}" '
                     f'height="{h:.2f}" fill="#4a78b5"><title>{edges[i]:.6g} to {edges[i + 1]:.6g}: '
                     f'{int(count)}</title></rect>')
    lo_text, hi_text = _range_text(lo, hi)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="0" y="12" font-size="12">{html.escape(title)} (n={values.size})</text>'
            f'{"".join(rects)}<line x1="0" y1="{bottom}" x2="{width}" y2="{bottom}" stroke="#333"/>'
            f'<text x="0" y="{height - 4}" font-size="11">{lo_text}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{hi_text}</text></svg>')


_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px}
th{background:#f0f0f0}.pass{background:#d9f2d9}.fail{background:#f7d4d4}
.row{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0 18px}.row figure{margin:0}
.row img{border:1px solid #999;display:block}
figcaption{font-size:12px;max-width:160px;overflow-wrap:anywhere}
.hist{display:flex;flex-wrap:wrap;gap:12px;margin:4px 0;align-items:flex-end}
.who{width:170px;font-size:13px;font-weight:bold;overflow-wrap:anywhere;align-self:center}
.input{border-top:1px solid #ddd;padding-top:8px}code{font-size:12px}
"""


def _summary_table(pairs: list[PairSummary]) -> str:
    """Measures down, candidates across (a few candidates fit any screen)."""
    head = "".join(f'<th title="{html.escape(p.candidate)}">{html.escape(_short(p.candidate))}</th>'
                   for p in pairs)
    verdicts = "".join(f'<td class="{"pass" if p.passed else "fail"}">'
                       f'{"pass" if p.passed else "FAIL: " + html.escape("; ".join(p.failures))}</td>'
                       for p in pairs)
    rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{p.values[k]:.6g}</td>" for p in pairs) + "</tr>"
                   for k in TABLE_KEYS if k in pairs[0].values)
    return f"<table><tr><th>measure</th>{head}</tr><tr><td>result</td>{verdicts}</tr>{rows}</table>"


def _input_section(rank: int, comparison: InputComparison, models: list[AuditedModel], alpha: float) -> str:
    figures = "".join(f'<figure><img src="{_png_uri(picture)}" alt="{html.escape(caption)}">'
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                      for caption, picture in input_panels(comparison, models, alpha))
    cells = "".join(
        f"<tr><td>{html.escape(_short(m.label))}</td><td>{row['pearson']:.6g}</td><td>{row['spearman']:.6g}</td>"
        f"<td>{row['iou_top20']:.4g}</td><td>{row['peak_distance']:.4g}</td><td>{row['prob_max_abs']:.4g}</td>"
        f"<td>{int(row['top1_agreement'])}</td></tr>" for m, row in zip(models[1:], comparison.pairs))
    table = ("<table><tr><th>candidate</th><th>pearson</th><th>spearman</th><th>iou_top20</th>"
             f"<th>peak_distance</th><th>prob_max_abs</th><th>top-1 agrees</th></tr>{cells}</table>")
    return (f'<div class="input"><b>{rank}. {html.escape(str(comparison.path))}</b>{table}'
            f'<div class="row">{figures}</div></div>')


class WorstInputs:
    """The ``limit`` worst inputs seen so far, compacted: what the report shows in detail, held in
    bounded memory however many inputs stream past."""

    def __init__(self, limit: int):
        self.limit = max(0, int(limit))
        self.items: list[InputComparison] = []

    def add(self, comparison: InputComparison) -> None:
        if self.limit == 0:
            return
        self.items.append(compact(comparison))
        if len(self.items) >= 2 * self.limit:
            self.items = self.ordered()

    def ordered(self) -> list[InputComparison]:
        return sorted(self.items, key=InputComparison.sort_key)[: self.limit]


def html_report(models: list[AuditedModel], inputs: list[InputComparison], pairs: list[PairSummary],
                method: str, target_policy: str, alpha: float = 0.5,
                detailed: list[InputComparison] | None = None) -> str:
    """The whole report as one HTML document: summary and histograms over ``inputs``, then the
    ``detailed`` ones (default: every input; they need their maps) with pictures, worst first."""
    model_rows = "".join(f"<tr><td>{'reference' if i == 0 else 'candidate'}</td><td>{html.escape(m.label)}"
                         f"</td><td><code>{html.escape(', '.join(m.nodes))}</code></td></tr>"
                         for i, m in enumerate(models))
    hists = []
    for c, pair in enumerate(pairs):
        svgs = "".join(histogram_svg([i.pairs[c][name] for i in inputs], name)
                       for name in HISTOGRAM_MEASURES if name in inputs[0].pairs[c])
        hists.append(f'<div class="hist"><div class="who">{html.escape(_short(pair.candidate))}</div>{svgs}</div>')
    ordered = sorted(inputs if detailed is None else detailed, key=InputComparison.sort_key)
    sections = "".join(_input_section(r, i, models, alpha) for r, i in enumerate(ordered, start=1))
    shown = "" if len(ordered) == len(inputs) else f" (the {len(ordered)} worst of {len(inputs)})"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>onnxcam compare</title>'
            f"<style>{_STYLE}</style></head><body><h1>onnxcam compare: {html.escape(method)}, "
            f"target policy {html.escape(target_policy)}, {len(inputs)} input(s)</h1>"
            f"<table><tr><th>role</th><th>model</th><th>node</th></tr>{model_rows}</table>"
            f"<h2>Summary per pair (candidate vs reference)</h2>{_summary_table(pairs)}"
            f"<h2>Agreement measures over the inputs</h2>{''.join(hists)}"
            f"<h2>Inputs, worst first (lowest map correlation){shown}</h2>"
            "<p>Overlays of every model, then each candidate's map minus the reference's "
            "(red: the candidate looks there more, blue: less).</p>"
            f"{sections}</body></html>")
