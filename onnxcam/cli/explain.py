"""`onnxcam explain`: files in, overlays / maps / a JSON summary out, in this process or on Ray."""
from __future__ import annotations

import json
import math

import click

from ..errors import OnnxcamError
from ..gradients import BACKENDS
from ..methods import METHODS
from ..runtime import PROVIDERS
from .app import main
from .options import (_explainer_options, _floats, _input_options, _prefix, _preprocessing, _progress_printer,
                      _size, _target, applicable_methods, model_io_options, read_labels, read_mask, token_options)


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
@click.option("-o", "--out", "out_dir", default="onnxcam_out", show_default=True, help="Output folder.")
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
@token_options
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
    from .. import IMPORT_START
    from ..profile import PROFILE, phase
    if profile:
        PROFILE.start(IMPORT_START)
    from ..explainer import Explainer
    from ..detection_files import file_runner
    from ..files import collect_inputs
    from ..methods import get_method
    from ..model import load_model
    from ..tokens import parse_grid

    if batch_size < 1:
        raise OnnxcamError("--batch-size must be at least 1")
    if top_k is not None and top_k < 1:
        raise OnnxcamError("--top-k must be at least 1")
    if max_pixels < 0:
        raise OnnxcamError("--max-pixels must be 0 (no limit) or a positive pixel count")
    if engine != "ray" and (ray_address or workers or worker_threads != 1 or fmt != "png"):
        raise OnnxcamError("--ray-address, --workers, --worker-threads and --format need --engine ray")
    if engine == "ray":
        from ..distributed import require_ray
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
    detection = (dict(fmt=detection_format or "auto", detection_index=detection_index, box=_box(box),
                      confidence=confidence, iou_threshold=iou_threshold)
                 if _detector(explainer, detection_format, detection_index, box, mask) else None)
    if engine == "ray":
        return _explain_on_ray(model, loaded, paths, out_dir, list(node_specs) or ["auto"], methods,
                               preprocessing, explainer_options, file_options, as_json, top_k, notices,
                               ray_address, workers, worker_threads, fmt, detection)
    file_options.update(progress=_progress_printer("score-cam", "masked inputs"),
                        batch_progress=_progress_printer("explained", "inputs", minimum=2 * batch_size),
                        fail_fast=fail_fast,
                        on_failure=lambda path, message: click.echo(f"error: {message}", err=True))
    runner = file_runner(explainer, preprocessing, out_dir, methods, detection, **file_options)
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
                    file_options, as_json, top_k, notices, address, workers, worker_threads, fmt, detection):
    """--engine ray: the same outputs, summary and failure report from a pool of Ray actors
    (onnxcam.distributed)."""
    from ..distributed import explain_dataset

    def shown(summary):
        if summary["notice"]:
            notices.append(f"{summary['input']} ({summary['method']}): {summary['notice']}")
        if not as_json:
            click.echo(_result_line(summary, top_k))

    run = explain_dataset(loaded, paths, out_dir, nodes=nodes, methods=methods, preprocessing=preprocessing,
                          explainer_options=explainer_options, workers=workers, worker_threads=worker_threads,
                          fmt=fmt, address=address, on_result=shown, detection=detection, **file_options)
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
    from ..detection import looks_like_detector, nms_node
    if fmt is not None or index is not None or box is not None:
        return True
    if mask is not None:
        return False
    if nms_node(explainer.model.view) is not None:
        return True
    shape = explainer.logits_static_shape
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

