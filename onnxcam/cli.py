"""Command line: a thin shell over the Python API. Parses flags, calls the API, prints results.

Every OnnxcamError becomes one line on stderr and exit code 1; nothing else is printed for it.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import replace

import click

from .cli_io import model_io_options, read_feeds
from .errors import OnnxcamError
from .gradients import BACKENDS
from .methods import METHODS
from .runtime import PROVIDERS

PROGRESS_MIN_TOTAL = 64


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError as exc:
        raise OnnxcamError(f"{name} {text!r} must be numbers separated by commas, e.g. 0.485,0.456,0.406") from exc


def _size_values(text: str | None) -> tuple[int, ...] | None:
    """--size as 1 to 3 positive ints: L (signals), H,W (images; one number for a square), D,H,W."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.lower().replace("x", ",").replace(" ", ",").split(",") if v]
    except ValueError as exc:
        raise OnnxcamError(f"--size {text!r} must be L, HEIGHT,WIDTH or D,H,W, e.g. 224,224") from exc
    if len(values) not in (1, 2, 3) or min(values) <= 0:
        raise OnnxcamError(f"--size {text!r} must be L, HEIGHT,WIDTH or D,H,W, e.g. 224,224")
    return tuple(values)


def _size(text: str | None) -> tuple[int, int] | None:
    """--size for images: (height, width)."""
    values = _size_values(text)
    if values is None:
        return None
    if len(values) == 3:
        raise OnnxcamError(f"--size {text!r} has three values (D,H,W) but the model takes images; give HEIGHT,WIDTH")
    return (values[0], values[-1])


def _probe_input_shape(loaded, preprocessing, size_text: str | None, layout: str | None):
    """The batch-1 input shape for the one probe run that measures layer shapes: from the image
    preprocessing for image models, from --size (L or D,H,W) for signals and volumes."""
    shape = loaded.input.shape
    if shape is None or len(shape) == 4:
        return preprocessing.probe_shape(shape)
    values = _size_values(size_text)
    if values is None:
        return None
    spatial = len(shape) - 2
    if len(values) != spatial:
        raise OnnxcamError(f"--size {size_text!r} gives {len(values)} value(s) but the model's input "
                           f"{loaded.input.name} has {spatial} spatial axes; give {'L' if spatial == 1 else 'D,H,W'}")
    from . import layouts
    channels_first = (layouts.normalize_layout(layout) or layouts.input_layout(shape)) == layouts.FIRST
    channels = shape[1] if channels_first else shape[-1]
    if not isinstance(channels, int) or channels <= 0:
        raise OnnxcamError(f"the channel axis of input {loaded.input.name} is symbolic; onnxcam cannot guess "
                           "the probe shape")
    return (1, channels, *values) if channels_first else (1, *values, channels)


class _Group(click.Group):
    """Turns OnnxcamError into a one-line message and a non-zero exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OnnxcamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory; use smaller inputs or --size, a smaller --batch-size, or a "
                       "lower --max-pixels", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="onnxcam")
def main():
    """Class activation maps (Grad-CAM, Score-CAM, LayerCAM, ...) for any ONNX model."""


def _preprocessing(model, size, mean, std, scale, layout, bgr, preset=None):
    from .preprocess import Preprocessing
    base = Preprocessing.from_metadata(model.preprocess, model.input.shape)
    if preset:
        base = base.with_preset(preset)
    fields = {}
    if size is not None:
        fields["size"] = size
    if mean is not None:
        fields["mean"] = mean
    if std is not None:
        fields["std"] = std
    if scale is not None:
        fields["scale"] = scale
    if layout is not None:
        fields["layout"] = layout.upper()
    if bgr:
        fields["color"] = "BGR"
    return replace(base, **fields).validated()


def _input_options(command):
    """The preprocessing flags shared by explain and evaluate."""
    options = [
        click.option("--size", help="Resize inputs to HEIGHT,WIDTH (default: model metadata / input shape)."),
        click.option("--mean", help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Per-channel std divided by, e.g. 0.229,0.224,0.225."),
        click.option("--scale", type=float, help="Pixel scale applied first (default 1/255)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                     help="Input layout (default: model metadata or detected from the input shape)."),
        click.option("--bgr", is_flag=True, help="Feed channels in BGR order."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _explainer_options(loaded, preprocessing, size, layout, provider, grad_backend, probabilities, no_cache,
                       feed_specs, output_name, class_axis) -> dict:
    """The Explainer keyword arguments explain (both engines) and evaluate build from their flags."""
    return dict(provider=provider, grad_backend=grad_backend,
                layout=layout or preprocessing.explainer_layout(loaded.input.rank), probabilities=probabilities,
                input_shape=_probe_input_shape(loaded, preprocessing, size, layout), cache=not no_cache,
                feeds=read_feeds(feed_specs), output=output_name, class_axis=class_axis)


def _explainer(loaded, node_specs, preprocessing, *flags):
    """The Explainer that explain and evaluate build from their flags (see _explainer_options)."""
    from .explainer import Explainer
    return Explainer(loaded, list(node_specs) or ["auto"], **_explainer_options(loaded, preprocessing, *flags))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--size", help="Input HEIGHT,WIDTH for models with symbolic spatial axes.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--tokens-grid", help="Transformer tokens: the patch grid HEIGHT,WIDTH (default: guessed "
                                    "from the input size and the token count).")
@click.option("--prefix-tokens", type=int, help="Transformer tokens: how many class/distillation/register "
                                                "tokens come before the patch tokens (default: guessed).")
def nodes(model, size, as_json, tokens_grid, prefix_tokens):
    """List the nodes whose output can be explained, with shapes; * marks the default."""
    from . import layouts
    from .model import load_model
    from .nodes import default_node, format_table, list_candidates
    from .tokens import grids_of, is_transformer, parse_grid

    loaded = load_model(model)
    preprocessing = _preprocessing(loaded, _size(size), None, None, None, None, False)
    probe = preprocessing.probe_shape(loaded.input.shape)
    candidates = list_candidates(loaded.proto, {loaded.input.name: probe} if probe else None)
    if not candidates:
        raise OnnxcamError(f"{model} has no node with a spatial output (rank 3-5); nothing to explain")
    default = default_node(candidates, loaded.proto)
    input_spatial = layouts.spatial_shape(probe, layouts.input_layout(probe)) if probe else None
    grid = parse_grid(tokens_grid)
    reads_tokens = grid is not None or prefix_tokens is not None or is_transformer(loaded)
    grids = grids_of(candidates, input_spatial, grid, prefix_tokens) if reads_tokens else {}
    if as_json:
        click.echo(json.dumps([{"node": c.name, "op_type": c.op_type, "tensor": c.tensor,
                                "shape": list(c.shape) if c.shape else None, "scope": c.scope,
                                "default": c.name == default.name,
                                **({"token_grid": grids[c.tensor]} if c.tensor in grids else {})}
                               for c in candidates], indent=2))
    else:
        click.echo(format_table(candidates, default, grids))


def _progress_printer(label: str, unit: str, minimum: int = PROGRESS_MIN_TOTAL):
    """A progress line for long runs, drawn on stderr when it is a terminal (stdout stays clean)."""
    if not sys.stderr.isatty():
        return None

    def progress(done: int, total: int):
        if total >= minimum:
            click.echo(f"\r{label}: {done}/{total} {unit}", err=True, nl=done >= total)
    return progress


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--node", "node_specs", multiple=True,
              help="Node to explain: node name, output tensor, module scope (layer4), scope/op "
                   "(/layer4/Relu), Keras layer name, or auto. Repeat to fuse several layers.")
@click.option("--method", default="gradcam", show_default=True,
              help=f"{', '.join(METHODS)}, a comma-separated list of them, or all (every method that "
                   "applies); several methods share one run and give one grid.")
@click.option("--target", help="Class to explain (index or class name); default: the top class.")
@click.option("--top-k", type=int, help="Explain each of the K top classes (one map per class).")
@click.option("--out", "out_dir", default="onnxcam_out", show_default=True, help="Output folder.")
@click.option("--npy", is_flag=True, help="Also save the raw maps as .npy.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Heatmap weight in the overlay.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--grad-backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Images per run; masked inputs per run for Score-CAM.")
@click.option("--max-channels", type=int, help="Score-CAM: keep the K highest-variance channels "
                                                "(Faster Score-CAM).")
@_input_options
@click.option("--probabilities", is_flag=True, help="Score the Softmax output instead of the logits.")
@click.option("--overwrite", is_flag=True, help="Explain inputs again even if their outputs exist.")
@click.option("--max-pixels", type=int, default=100_000_000, show_default=True,
              help="Refuse images whose header declares more pixels (read before decoding; 0: no limit).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first input that cannot be read (default: "
                                                "report it, skip it, exit 1 at the end).")
@click.option("--no-cache", is_flag=True, help="Build the augmented model afresh instead of reading it "
                                               "from the cache ($ONNXCAM_CACHE_DIR or ~/.cache/onnxcam).")
@click.option("--labels", type=click.Path(dir_okay=False), help="Class names, one per line (overrides "
                                                                 "the model's metadata).")
@click.option("--target-mask", type=click.Path(dir_okay=False),
              help="Segmentation outputs (N,K,H,W): score the --target class summed over this mask "
                   "(.npy array or image; nonzero pixels count), sized like the output map.")
@click.option("--tokens-grid", help="Transformer token nodes (N,T,C): the patch grid HEIGHT,WIDTH "
                                    "(default: guessed from the input size and the token count).")
@click.option("--prefix-tokens", type=int, help="Transformer token nodes: class/distillation/register "
                                                "tokens before the patch tokens, dropped (default: guessed).")
@click.option("--detection-format", type=click.Choice(["auto", "yolov8", "yolov5"]), default=None,
              help="YOLO-style raw head: yolov8 (N,4+K,A) or yolov5 (N,A,5+K); auto tells them apart by "
                   "shape. Detectors are recognised by their output shape without it.")
@click.option("--detection", "detection_index", type=int,
              help="Detectors: explain the K-th detection after NMS, by confidence (0 = best; default 0).")
@click.option("--box", help="Detectors: explain the prediction whose box best overlaps X1,Y1,X2,Y2 "
                            "(image pixels).")
@click.option("--confidence", type=float, default=0.25, show_default=True,
              help="Detectors: confidence threshold before NMS.")
@click.option("--iou", "iou_threshold", type=float, default=0.45, show_default=True,
              help="Detectors: NMS IoU threshold.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: a pool of Ray actors on this machine or a cluster "
                   "(needs onnxcam[ray]).")
@click.option("--ray-address", help="Ray engine: cluster to join (auto: the one `ray start` runs here, or "
                                    "HOST:PORT); default: that one if any, else Ray on this machine's cores.")
@click.option("--workers", type=int, help="Ray engine: actors explaining in parallel (default: the "
                                          "cluster's CPUs / --worker-threads).")
@click.option("--worker-threads", type=int, default=1, show_default=True,
              help="Ray engine: ONNX Runtime threads (and CPUs reserved) per actor.")
@click.option("--format", "fmt", type=click.Choice(["png", "parquet"]), default="png", show_default=True,
              help="Ray engine: png writes overlays (and --npy maps) as files; parquet writes maps and "
                   "summaries as a Parquet dataset into --out.")
@click.option("--maps", "maps_engine", type=click.Choice(["auto", "graph", "numpy"]), default="auto",
              show_default=True, help="Where gradient methods' final maps are computed: ONNX ops in the "
                                      "session (graph), the NumPy engine (numpy), or auto.")
@click.option("--profile", is_flag=True, help="Print the call's fixed costs (imports, model load, node "
                                              "table, session creation, run, writing) on stderr.")
@model_io_options
def explain(model, inputs, node_specs, method, target, top_k, out_dir, npy, as_json, alpha, provider,
            grad_backend, batch_size, max_channels, size, mean, std, scale, layout, bgr, probabilities,
            overwrite, max_pixels, fail_fast, no_cache, labels, target_mask, input_name, feed_specs,
            output_name, class_axis, preset, engine, ray_address, workers, worker_threads, fmt, maps_engine,
            profile, tokens_grid, prefix_tokens, detection_format, detection_index, box, confidence,
            iou_threshold):
    """Explain INPUTS (images, .npy arrays, folders or globs) with a class activation map."""
    from . import IMPORT_START
    from .profile import PROFILE, phase
    if profile:
        PROFILE.start(IMPORT_START)
    from .explainer import Explainer
    from .files import FileExplainer, collect_inputs
    from .methods import get_method
    from .model import load_model
    from .tokens import parse_grid

    if batch_size < 1:
        raise OnnxcamError("--batch-size must be at least 1")
    if top_k is not None and top_k < 1:
        raise OnnxcamError("--top-k must be at least 1")
    if max_pixels < 0:
        raise OnnxcamError("--max-pixels must be 0 (no limit) or a positive pixel count")
    if engine != "ray" and (ray_address or workers or worker_threads != 1 or fmt != "png"):
        raise OnnxcamError("--ray-address, --workers, --worker-threads and --format need --engine ray")
    if engine == "ray":
        from .distributed import require_ray
        require_ray()
        if fail_fast:
            raise OnnxcamError("--fail-fast applies to --engine local; the Ray engine reports unreadable "
                               "inputs and goes on")
    if max_channels is not None and max_channels < 1:
        raise OnnxcamError("--max-channels must be at least 1")
    if not math.isfinite(alpha):
        raise OnnxcamError(f"--alpha {alpha} must lie in [0, 1]")
    if scale is not None and not math.isfinite(scale):
        raise OnnxcamError(f"--scale {scale} must be a finite number")
    with phase("model load"):
        loaded = load_model(model, input=input_name)
    images = loaded.input.rank in (None, 4)
    parsed_size = _size(size) if images else None
    if parsed_size is not None and parsed_size[0] * parsed_size[1] > (max_pixels or 100_000_000):
        raise OnnxcamError(f"--size {size} is {parsed_size[0] * parsed_size[1] / 1e6:g} megapixels, over the "
                           f"--max-pixels limit; pass a smaller size")
    paths = collect_inputs(list(inputs))
    preprocessing = _preprocessing(loaded, parsed_size, _floats(mean, "--mean"), _floats(std, "--std"),
                                   scale, layout, bgr, preset)
    notices = []
    if images and not loaded.preprocess and not (preset or mean or std or scale is not None):
        notices.append("the model carries no preprocessing metadata, so images are fed as RGB x/255 with no "
                       "mean/std; pass --preset NAME or --mean/--std/--scale if it was trained otherwise")
    explainer_options = dict(_explainer_options(loaded, preprocessing, size, layout, provider, grad_backend,
                                                probabilities, no_cache, feed_specs, output_name, class_axis),
                             maps=maps_engine)
    with phase("node table"):
        explainer = Explainer(loaded, list(node_specs) or ["auto"], **explainer_options,
                              tokens_grid=parse_grid(tokens_grid), prefix_tokens=_prefix(prefix_tokens))
    if method == "all":
        methods, skipped_methods = applicable_methods(explainer, with_reasons=True)
        notices += [f"--method all skips {name}: {why}" for name, why in skipped_methods]
    else:
        methods = list(dict.fromkeys(get_method(m.strip()).name for m in method.split(",") if m.strip()))
    if not methods:
        raise OnnxcamError(f"--method {method!r} names no method; e.g. --method gradcam or gradcam,layercam")
    class_names = read_labels(labels) if labels else loaded.class_names
    mask = read_mask(target_mask) if target_mask else None
    if mask is not None and target is None:
        raise OnnxcamError("--target-mask needs --target CLASS: the class whose logits the mask sums")
    file_options = dict(target=_target(target, class_names), target_mask=mask, class_names=class_names,
                        top_k=top_k, alpha=alpha, save_npy=npy, batch_size=batch_size,
                        overwrite=overwrite, max_channels=max_channels, max_pixels=max_pixels or None)
    if engine == "ray":
        return _explain_on_ray(model, loaded, paths, out_dir, list(node_specs) or ["auto"], methods,
                               preprocessing, explainer_options, file_options, as_json, top_k, notices,
                               ray_address, workers, worker_threads, fmt)
    file_options.update(progress=_progress_printer("score-cam", "masked inputs"),
                        batch_progress=_progress_printer("explained", "inputs", minimum=2 * batch_size),
                        fail_fast=fail_fast,
                        on_failure=lambda path, message: click.echo(f"error: {message}", err=True))
    if _detector(explainer, detection_format, detection_index, box, mask):
        from .detection_files import DetectionFileExplainer
        runner = DetectionFileExplainer(explainer, preprocessing, out_dir, methods, fmt=detection_format or "auto",
                                        detection_index=detection_index, box=_box(box), confidence=confidence,
                                        iou_threshold=iou_threshold, **file_options)
    else:
        runner = FileExplainer(explainer, preprocessing, out_dir, methods, **file_options)
    summaries = []
    for result in runner.run(paths):
        summaries.append(result.summary())
        if result.notice:
            notices.append(f"{result.path} ({result.method}): {result.notice}")
        if not as_json:
            click.echo(_result_line(summaries[-1], top_k))
    if runner.skipped and not as_json:
        click.echo(f"skipped {runner.skipped} input(s) already explained in {out_dir} (use --overwrite)")
    for notice in notices:   # after the results: a run that fails says only its error
        click.echo(f"notice: {notice}", err=True)
    if as_json:
        click.echo(json.dumps({"model": str(model), "backend": explainer.gradient_backend_used,
                               "skipped": runner.skipped, "results": summaries, "notices": notices,
                               "failed": [{"input": str(p), "error": m} for p, m in runner.failures]},
                              indent=2, allow_nan=False))
    if profile:
        click.echo(PROFILE.report(), err=True)
    if runner.failures:
        raise OnnxcamError(f"{len(runner.failures)} of {len(paths)} input(s) could not be read and were "
                           "skipped (errors above); fix or remove them (--fail-fast stops at the first)")


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
@click.option("--out", "out_dir", metavar="DIR", help="Also write one PNG per input (overlays and differences) and "
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

    from .audit.compare import (AuditedModel, parse_thresholds, report_json, run_comparison, summarize,
                                 summary_text)
    from .audit.report import WorstInputs, html_report, input_panels, panel_grid
    from .explainer import Explainer
    from .files import collect_inputs, output_stem
    from .methods import get_method
    from .model import load_model
    from .outputs import prepare_dir, write_bytes_atomic, write_png

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

    from . import outputs
    from .evaluate import Evaluator
    from .evaluate.boxes import load_boxes
    from .evaluate.report import csv_bytes, curves_picture, summary_json, table
    from .evaluate.run import FileEvaluation, parse_metrics
    from .files import collect_inputs
    from .methods import get_method
    from .model import load_model

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


def _result_line(summary: dict, top_k) -> str:
    name = f" ({summary['class_name']})" if summary["class_name"] else ""
    rank = f" top{summary['rank']}" if top_k else ""
    found = summary.get("detection")
    rank += f" box {','.join(f'{v:g}' for v in found['box'])}" if found else ""
    score = f"{summary['score']:.4f}" if summary["score"] is not None else "nan"
    return (f"{summary['input']}: class {summary['class']}{name}{rank} score {score} "
            f"node {','.join(summary['nodes'])} {summary['method']} {summary['seconds'] * 1000:.1f} ms"
            + (f" -> {', '.join(summary['outputs'])}" if summary["outputs"] else ""))


def _explain_on_ray(model, loaded, paths, out_dir, nodes, methods, preprocessing, explainer_options,
                    file_options, as_json, top_k, notices, address, workers, worker_threads, fmt):
    """--engine ray: the same outputs, summary and failure report from a pool of Ray actors
    (onnxcam.distributed)."""
    from .distributed import explain_dataset

    def shown(summary):
        if summary["notice"]:
            notices.append(f"{summary['input']} ({summary['method']}): {summary['notice']}")
        if not as_json:
            click.echo(_result_line(summary, top_k))

    run = explain_dataset(loaded, paths, out_dir, nodes=nodes, methods=methods, preprocessing=preprocessing,
                          explainer_options=explainer_options, workers=workers, worker_threads=worker_threads,
                          fmt=fmt, address=address, on_result=shown, **file_options)
    for failure in run.failed:
        click.echo(f"error: {failure['error']}", err=True)
    if run.skipped and not as_json:
        click.echo(f"skipped {run.skipped} input(s) already explained in {out_dir} (use --overwrite)")
    if run.parquet is not None and not as_json:
        click.echo(f"wrote maps and summaries as Parquet into {run.parquet}")
    for notice in notices:
        click.echo(f"notice: {notice}", err=True)
    if as_json:
        click.echo(json.dumps({"model": str(model), "backend": run.backend, "skipped": run.skipped,
                               "results": run.results, "notices": notices, "failed": run.failed},
                              indent=2, allow_nan=False))
    if run.failed:
        raise OnnxcamError(f"{len(run.failed)} of {len(paths)} input(s) could not be read and were "
                           "skipped (errors above); fix or remove them")


def _detector(explainer, fmt, index, box, mask) -> bool:
    """Explain as a detector: asked for by a detection flag, or the model has NMS inside or a raw
    YOLO-shaped first output (and no --target-mask says it is a map)."""
    from .detection import looks_like_detector, nms_node
    if fmt is not None or index is not None or box is not None:
        return True
    if mask is not None:
        return False
    view = explainer.model.view
    if nms_node(view) is not None:
        return True
    shape = view.static_shape(explainer.logits_name)
    if shape is not None and len(shape) == 3 and None in shape[1:] and explainer.probe_shape is not None:
        import numpy as np     # the head's length is symbolic: measure it on the probe input
        shape = explainer.forward(np.zeros(explainer.probe_shape, np.float32))[0].shape
    return looks_like_detector(shape)


def _box(text: str | None):
    if text is None:
        return None
    values = _floats(text, "--box")
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise OnnxcamError(f"--box {text!r} must be X1,Y1,X2,Y2 in image pixels with X2 > X1 and Y2 > Y1")
    return values


def _prefix(count: int | None) -> int | None:
    if count is not None and count < 0:
        raise OnnxcamError("--prefix-tokens must be 0 or more")
    return count


def read_labels(path: str) -> list[str]:
    from pathlib import Path
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxcamError(f"cannot read --labels {path} ({exc}); give a UTF-8 text file, one name per line") from exc
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise OnnxcamError(f"--labels {path} holds no class names; give one name per line")
    return names


def read_mask(path: str):
    """A float mask from a .npy array or an image (nonzero pixels are 1)."""
    import numpy as np
    from pathlib import Path

    from .preprocess import read_image
    if Path(path).suffix.lower() == ".npy":
        try:
            mask = np.load(path, allow_pickle=False).astype(np.float32)
        except Exception as exc:
            raise OnnxcamError(f"--target-mask {path} is not a readable numeric .npy array "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not np.isfinite(mask).all():
            raise OnnxcamError(f"--target-mask {path} holds NaN or infinite values")
        return mask
    return (read_image(path).max(axis=-1) > 0).astype(np.float32)


@main.command("export-augmented")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--node", "node_specs", multiple=True, help="Node(s) to expose with their gradients "
                                                          "(same forms as for explain; default auto).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--grad-backend", type=click.Choice(BACKENDS), default="portable", show_default=True,
              help="portable runs on any ONNX Runtime build; ort-training needs a training build.")
@click.option("--size", help="Input HEIGHT,WIDTH for models with symbolic spatial axes.")
@click.option("--probabilities", is_flag=True, help="Score the Softmax output instead of the logits.")
def export_augmented(model, node_specs, output, grad_backend, size, probabilities):
    """Write the augmented model: inputs = the model's inputs + onnxcam_target_weights (N x K, zero rows =
    arg-max class); outputs = logits, activations, d score / d activations."""
    from pathlib import Path

    from .explainer import Explainer
    from .model import load_model
    from .outputs import write_bytes_atomic

    loaded = load_model(model)
    if loaded.path is not None and Path(output).resolve() == loaded.path.resolve():
        raise OnnxcamError(f"refusing to overwrite the input model {model}; choose another -o path")
    preprocessing = _preprocessing(loaded, _size(size), None, None, None, None, False)
    explainer = Explainer(loaded, list(node_specs) or ["auto"], grad_backend=grad_backend,
                          layout=preprocessing.explainer_layout(loaded.input.rank),
                          probabilities=probabilities,
                          input_shape=preprocessing.probe_shape(loaded.input.shape))
    augmented = explainer.augmented_gradient_model()
    data = augmented.proto.SerializeToString()
    if len(data) >= 2 ** 31:
        raise OnnxcamError("the augmented model is over 2 GB, which a single ONNX file cannot hold")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output, data, {loaded.path.resolve()} if loaded.path else set())
    click.echo(f"wrote {output} ({augmented.backend} gradients): inputs "
               f"{', '.join(i.name for i in augmented.proto.graph.input if i.name not in _initializers(augmented.proto))}; "
               f"outputs {', '.join(augmented.output_names)}")


@main.group("cache")
def cache_group():
    """Inspect or empty the augmented-model cache ($ONNXCAM_CACHE_DIR, default ~/.cache/onnxcam;
    capped at $ONNXCAM_CACHE_MAX_MB megabytes, default 2048, least recently used entries evicted)."""


@cache_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def cache_info(as_json):
    """Folder, number of entries, size and cap."""
    from .cache import default_cache_dir
    from .cache_limits import info
    facts = info(default_cache_dir())
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"{facts['folder']}: {facts['entries']} entr{'y' if facts['entries'] == 1 else 'ies'}, "
               f"{facts['bytes'] / 2**20:.1f} MB of {facts['max_bytes'] / 2**20:.0f} MB"
               + (f", {facts['temporaries']} leftover temporary file(s)" if facts["temporaries"] else ""))


@cache_group.command("clear")
def cache_clear():
    """Remove every cached model (and leftover temporaries); other files are left alone."""
    from .cache import default_cache_dir
    from .cache_limits import clear
    folder = default_cache_dir()
    count, freed = clear(folder)
    click.echo(f"removed {count} cached model(s), {freed / 2**20:.1f} MB, from {folder}")


def _initializers(proto) -> set[str]:
    return {init.name for init in proto.graph.initializer}


def _target(text: str | None, class_names):
    if text is None:
        return None
    if re.fullmatch(r"\s*[+-]?\d+\s*", text):
        value = int(text)
        if value < 0:
            raise OnnxcamError(f"--target {text!r} must be a class index >= 0 or a class name")
        return value
    names = class_names or []
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise OnnxcamError(f"--target {text!r} is neither a class index nor a class name of this model")


def applicable_methods(explainer, with_reasons: bool = False):
    """Every method that can run on this model and node (for --method all); with_reasons: also the
    (method, why) pairs of those that cannot."""
    chosen, skipped = [], []
    for name in METHODS:
        try:
            explainer.check_method(name)
        except OnnxcamError as exc:
            skipped.append((name, str(exc)))
            continue
        chosen.append(name)
    return (chosen, skipped) if with_reasons else chosen


if __name__ == "__main__":
    main()
