"""`onnxcam evaluate`: faithfulness and localisation metrics of CAM methods."""
from __future__ import annotations

import json

import click

from ..errors import OnnxcamError
from ..gradients import BACKENDS
from ..runtime import PROVIDERS
from .app import main
from .options import _explainer, _floats, _input_options, _preprocessing, _progress_printer, _size, applicable_methods, model_io_options, read_labels


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--method", "method_names", multiple=True,
              help="Method to evaluate (repeat for several, or all); default gradcam.")
@click.option("--node", "node_specs", multiple=True, help="Node to explain (same forms as for explain).")
@click.option("--metrics", "metric_list",
              help="Comma-separated: average_drop (ad), increase_in_confidence (ic), deletion_auc "
                   "(deletion), insertion_auc (insertion), pointing_game (pointing), energy_pointing_game "
                   "(energy), loc1, loc5 (loc), faithfulness, localisation, all. Default: the four "
                   "faithfulness metrics, plus localisation with --boxes.")
@click.option("--boxes", "boxes_path", type=click.Path(),
              help="Ground-truth boxes: Pascal VOC .xml (or a folder of them), COCO .json, or .csv rows "
                   "file,x1,y1,x2,y2,class (class index or name); matched to inputs by file name.")
@click.option("--steps", type=int, default=20, show_default=True, help="Deletion / insertion intervals.")
@click.option("--baseline", type=click.Choice(["zero", "blur", "mean"]), default="zero", show_default=True,
              help="What deleted pixels become: zeros, an 11x11 Gaussian blur (sigma 5) of the input, or "
                   "each channel's mean.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Inputs per explain run and perturbed inputs per forward run (bounds memory).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write per-input values to this CSV.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False),
              help="Write deletion and insertion curves per method (mean and +-1 std band) as PNG here.")
@click.option("--loc-threshold", type=float, default=0.2, show_default=True,
              help="loc1 / loc5: keep map values >= this fraction of the map's maximum.")
@click.option("--max-channels", type=int, help="Score-CAM: keep the K highest-variance channels.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Class names, one per line (for class "
                                                                 "names in --boxes).")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--grad-backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--no-cache", is_flag=True, help="Build the augmented model afresh instead of reading the cache.")
@_input_options
@model_io_options
def evaluate(model, inputs, method_names, node_specs, metric_list, boxes_path, steps, baseline, batch_size,
             as_json, csv_path, plots_dir, loc_threshold, max_channels, labels, provider, grad_backend,
             no_cache, size, mean, std, scale, layout, bgr, input_name, feed_specs, output_name, class_axis,
             preset):
    """Score CAM methods on INPUTS: Average Drop, Increase in Confidence, Deletion / Insertion AUC and,
    with --boxes, pointing game, energy pointing game and loc1 / loc5."""
    from pathlib import Path

    from .. import outputs
    from ..evaluate import Evaluator
    from ..evaluate.boxes import load_boxes
    from ..evaluate.report import csv_bytes, curves_picture, summary_json, table
    from ..evaluate.run import FileEvaluation, parse_metrics
    from ..files import collect_inputs
    from ..methods import get_method
    from ..model import load_model

    loaded = load_model(model, input=input_name)
    paths = collect_inputs(list(inputs))
    protected = {p.resolve() for p in paths} | ({loaded.path.resolve()} if loaded.path else set())
    boxes = load_boxes(boxes_path) if boxes_path else None
    metric_names = parse_metrics(metric_list, boxes is not None)
    if csv_path and Path(csv_path).resolve() in protected:
        raise OnnxcamError(f"refusing to overwrite input file {csv_path}; choose another --csv path")
    plots = outputs.prepare_dir(plots_dir) if plots_dir else None
    preprocessing = _preprocessing(loaded, _size(size) if loaded.input.rank in (None, 4) else None,
                                   _floats(mean, "--mean"), _floats(std, "--std"), scale, layout, bgr, preset)
    explainer = _explainer(loaded, node_specs, preprocessing, size, layout, provider, grad_backend, False,
                           no_cache, feed_specs, output_name, class_axis)
    names = list(method_names) or ["gradcam"]
    methods = applicable_methods(explainer) if "all" in names else []
    for name in names:
        if name != "all" and get_method(name).name not in methods:
            explainer.check_method(name)
            methods.append(get_method(name).name)
    evaluator = Evaluator(explainer, metric_names, steps=steps, baseline=baseline, batch_size=batch_size,
                          loc_threshold=loc_threshold, max_channels=max_channels)
    class_names = read_labels(labels) if labels else loaded.class_names
    run = FileEvaluation(evaluator, preprocessing, methods, boxes, class_names,
                         progress=_progress_printer("evaluate", "perturbed inputs scored", minimum=1))
    run.run(paths)
    if boxes is not None and run.without_boxes:
        click.echo(f"note: {run.without_boxes} of {len(paths)} inputs have no box in "
                   f"{boxes_path}; localisation counts the others", err=True)
    totals = list(run.totals.values())
    if csv_path:
        outputs.write_bytes_atomic(csv_path, csv_bytes(run.rows), protected)
    if plots is not None:
        for total in totals:
            picture = curves_picture(total)
            if picture is not None:
                outputs.write_png(plots / f"{total.method.replace('+', 'pp')}_curves.png", picture, protected)
    if as_json:
        click.echo(json.dumps(summary_json(str(model), len(paths), totals), indent=2))
    else:
        click.echo(table(totals, len(paths)))
