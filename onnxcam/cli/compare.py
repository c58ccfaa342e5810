"""`onnxcam compare`: predictions and maps of several models on the same inputs, gates, HTML report."""
from __future__ import annotations

import json
import sys

import click

from ..errors import OnnxcamError
from ..gradients import BACKENDS
from ..runtime import PROVIDERS
from .app import main
from .options import _floats, _preprocessing, _progress_printer, _size


def _per_model(values: tuple[str, ...], count: int, flag: str, default):
    """A flag given once (every model) or once per model, in model order."""
    if not values:
        return [default] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise OnnxcamError(f"{flag} was given {len(values)} times for {count} models; give it once for "
                           "every model, or once per model in model order")
    return list(values)


def _preprocess_spec(loaded, text: str | None):
    """--preprocess 'size=H,W;mean=..;std=..;scale=..;layout=NHWC;color=BGR' ('-': the model's defaults)
    -> (Preprocessing, the layout the Explainer must use or None to let the model's shape say)."""
    fields = {}
    for part in (p.strip() for p in (text or "").split(";")):
        if not part or part == "-":
            continue
        key, sep, value = (t.strip() for t in part.partition("="))
        if not sep or key not in ("size", "mean", "std", "scale", "layout", "color"):
            raise OnnxcamError(f"--preprocess {part!r} must be KEY=VALUE with KEY one of size, mean, std, "
                               "scale, layout, color, e.g. 'size=224,224;mean=0.5,0.5,0.5'")
        fields[key] = value
    if fields.get("color", "RGB").upper() not in ("RGB", "BGR"):
        raise OnnxcamError(f"--preprocess color={fields['color']} must be RGB or BGR")
    scale = _floats(fields.get("scale"), "--preprocess scale")
    if fields.get("layout") and fields["layout"].upper() not in ("NCHW", "NHWC"):
        raise OnnxcamError(f"--preprocess layout={fields['layout']} must be NCHW or NHWC")
    preprocessing = _preprocessing(loaded, _size(fields.get("size")),
                                   _floats(fields.get("mean"), "--preprocess mean"),
                                   _floats(fields.get("std"), "--preprocess std"), scale[0] if scale else None,
                                   fields.get("layout"), fields.get("color", "RGB").upper() == "BGR")
    # images: the preprocessing's layout; arrays of other ranks come in the model's own layout
    explicit = fields.get("layout") is not None or loaded.input.rank == 4
    return preprocessing, preprocessing.layout if explicit else None


def _unique_name(name: str, used: set[str]) -> str:
    """``name``, or name_2, name_3, ... when an earlier input already took it (a/x.png and b/x.png)."""
    stem, dot, ext = name.rpartition(".")
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}{dot}{ext}"
    used.add(candidate)
    return candidate


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="REFERENCE.onnx CANDIDATE.onnx [MORE.onnx...] INPUTS...")
@click.option("--method", default="gradcam", show_default=True,
              help="gradcam, gradcam++, xgradcam, hirescam, layercam, eigencam, scorecam or cam.")
@click.option("--node", "node_specs", multiple=True,
              help="Node to explain: once for every model, or once per model in model order (default auto).")
@click.option("--preprocess", "preprocess_specs", multiple=True,
              help="Preprocessing overrides 'size=H,W;mean=..;std=..;scale=..;layout=NHWC;color=BGR': once "
                   "for every model or once per model ('-' keeps that model's metadata).")
@click.option("--target-policy", type=click.Choice(["reference", "own"]), default="reference", show_default=True,
              help="reference: every model explains the reference's top-1 class; own: its own top-1.")
@click.option("--fail-under", multiple=True, help="KEY=VALUE,...: exit 1 when a pair's agreement measure "
                                                  "falls below, e.g. pearson_min=0.9,top1_agreement=0.99.")
@click.option("--fail-over", multiple=True, help="KEY=VALUE,...: exit 1 when a pair's drift rises above, "
                                                 "e.g. prob_max_abs=0.05,peak_distance_max=0.1.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--html", "html_path", metavar="FILE", help="Write a self-contained HTML report.")
@click.option("--html-inputs", type=int, default=50, show_default=True,
              help="Inputs the report shows with pictures (the worst ones); summary and histograms cover all.")
@click.option("-o", "--out", "out_dir", metavar="DIR", help="Also write one PNG per input (overlays and differences) and "
                                       "compare.json into this folder.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Heatmap weight in the overlays.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--grad-backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Inputs per run; masked inputs per run for Score-CAM.")
@click.option("--max-channels", type=int, help="Score-CAM: keep the K highest-variance channels.")
@click.option("--probabilities", is_flag=True, help="Score the Softmax output instead of the logits.")
@click.option("--no-cache", is_flag=True, help="Build the augmented models afresh instead of reading the cache.")
@click.option("--deletion", is_flag=True, help="Also each model's deletion AUC (as `evaluate` scores it, "
                                               "own top-1, 20 steps) and each pair's difference.")
def compare(args, method, node_specs, preprocess_specs, target_policy, fail_under, fail_over, as_json,
            html_path, html_inputs, out_dir, alpha, provider, grad_backend, batch_size, max_channels,
            probabilities, no_cache, deletion):
    """Compare a reference model with candidates (other exports, quantized builds, retrains) on the
    same INPUTS: predictions and maps. Arguments ending in .onnx are models, the rest inputs."""
    from pathlib import Path

    from ..audit.compare import (AuditedModel, parse_thresholds, report_json, run_comparison, summarize,
                                 summary_text)
    from ..audit.report import WorstInputs, html_report, input_panels, panel_grid
    from ..explainer import Explainer
    from ..files import collect_inputs, output_stem
    from ..methods import get_method
    from ..model import load_model
    from ..outputs import prepare_dir, write_bytes_atomic, write_png

    model_paths = [a for a in args if a.lower().endswith(".onnx")]
    input_specs = [a for a in args if not a.lower().endswith(".onnx")]
    if len(model_paths) < 2:
        raise OnnxcamError("compare needs a reference and at least one candidate model (.onnx files) "
                           "before the inputs")
    if not input_specs:
        raise OnnxcamError("no input given; pass image files, folders, globs or .npy arrays after the models")
    if batch_size < 1:
        raise OnnxcamError("--batch-size must be at least 1")
    if html_inputs < 0:
        raise OnnxcamError("--html-inputs must be 0 or more")
    method = get_method(method).name
    under = parse_thresholds(fail_under, True, "--fail-under")
    over = parse_thresholds(fail_over, False, "--fail-over")
    if not deletion and any(k.startswith("deletion") for k in (*under, *over)):
        raise OnnxcamError("deletion_auc_diff gates need --deletion (deletion AUC is measured only then)")
    nodes = _per_model(node_specs, len(model_paths), "--node", "auto")
    pre_specs = _per_model(preprocess_specs, len(model_paths), "--preprocess", None)
    paths = collect_inputs(input_specs)
    models, seen = [], set()
    for path, node, pre in zip(model_paths, nodes, pre_specs):
        loaded = load_model(path)
        preprocessing, layout = _preprocess_spec(loaded, pre)
        explainer = Explainer(loaded, node, provider=provider, grad_backend=grad_backend,
                              layout=layout, probabilities=probabilities,
                              input_shape=preprocessing.probe_shape(loaded.input.shape), cache=not no_cache)
        explainer.check_method(method)
        label = path if path not in seen else f"{path} #{len(models) + 1}"
        seen.add(path)
        models.append(AuditedModel(label, explainer, preprocessing))
    protected = {Path(p).resolve() for p in (*paths, *model_paths)}
    out = prepare_dir(out_dir) if out_dir else None
    if html_path:                     # checked before the long run, not after it
        try:
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OnnxcamError(f"cannot create the folder of --html {html_path} ({exc.strerror})") from exc
        if Path(html_path).is_dir():
            raise OnnxcamError(f"--html {html_path} is a folder; give a file name such as report.html")
    kept, worst, names = [], WorstInputs(html_inputs if html_path else 0), set()
    for comparison in run_comparison(models, paths, method, target_policy, batch_size, max_channels,
                                     progress=_progress_printer("score-cam", "masked inputs"),
                                     batch_progress=_progress_printer("compared", "inputs",
                                                                      minimum=2 * batch_size),
                                     deletion=deletion):
        if out is not None:
            name = _unique_name(output_stem(comparison.path, method, None) + "_compare.png", names)
            write_png(out / name, panel_grid(input_panels(comparison, models, alpha, side=None)), protected)
        worst.add(comparison)
        kept.append(comparison.measures_only())
    pairs = summarize(models, kept, under, over)
    document = report_json(models, kept, pairs, method, target_policy)
    if out is not None:
        write_bytes_atomic(out / "compare.json", (json.dumps(document, indent=2) + "\n").encode(), protected)
    if html_path:
        page = html_report(models, kept, pairs, method, target_policy, alpha, detailed=worst.ordered())
        write_bytes_atomic(html_path, page.encode("utf-8"), protected)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(summary_text(document, models))
        if html_path:
            click.echo(f"report: {html_path}")
        if out_dir:
            click.echo(f"pictures and compare.json: {out_dir}")
    if not all(p.passed for p in pairs):
        sys.exit(1)
