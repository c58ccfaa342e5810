"""Command line: a thin shell over the Python API. Parses flags, calls the API, prints results.

Every OnnxcamError becomes one line on stderr and exit code 1; nothing else is printed for it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import click

from .errors import OnnxcamError
from .gradients import BACKENDS
from .runtime import PROVIDERS

PROGRESS_MIN_TOTAL = 64


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError as exc:
        raise OnnxcamError(f"{name} {text!r} must be numbers separated by commas, e.g. 0.485,0.456,0.406") from exc


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.lower().replace("x", ",").replace(" ", ",").split(",") if v]
    except ValueError as exc:
        raise OnnxcamError(f"--size {text!r} must be HEIGHT,WIDTH or one number, e.g. 224,224") from exc
    if len(values) not in (1, 2) or min(values) <= 0:
        raise OnnxcamError(f"--size {text!r} must be HEIGHT,WIDTH or one number, e.g. 224,224")
    return (values[0], values[-1])


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


@click.group(cls=_Group)
@click.version_option(package_name="onnxcam")
def main():
    """Class activation maps (Grad-CAM, Score-CAM, LayerCAM, ...) for any ONNX model."""


def _preprocessing(model, size, mean, std, scale, layout, bgr):
    from .preprocess import Preprocessing
    base = Preprocessing.from_metadata(model.preprocess, model.input.shape)
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
              help="gradcam, gradcam++, xgradcam, hirescam, layercam, eigencam, scorecam, cam, legrad "
                   "(vision transformers), or all.")
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
@click.option("--size", help="Resize inputs to HEIGHT,WIDTH (default: model metadata / input shape).")
@click.option("--mean", help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Per-channel std divided by, e.g. 0.229,0.224,0.225.")
@click.option("--scale", type=float, help="Pixel scale applied first (default 1/255).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
              help="Input layout (default: model metadata or detected from the input shape).")
@click.option("--bgr", is_flag=True, help="Feed channels in BGR order.")
@click.option("--probabilities", is_flag=True, help="Score the Softmax output instead of the logits.")
@click.option("--overwrite", is_flag=True, help="Explain inputs again even if their outputs exist.")
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
def explain(model, inputs, node_specs, method, target, top_k, out_dir, npy, as_json, alpha, provider,
            grad_backend, batch_size, max_channels, size, mean, std, scale, layout, bgr, probabilities,
            overwrite, no_cache, labels, target_mask, tokens_grid, prefix_tokens, detection_format,
            detection_index, box, confidence, iou_threshold):
    """Explain INPUTS (images, .npy arrays, folders or globs) with a class activation map."""
    from .explainer import Explainer
    from .files import FileExplainer, collect_inputs
    from .methods import get_method
    from .model import load_model
    from .tokens import parse_grid

    if batch_size < 1:
        raise OnnxcamError("--batch-size must be at least 1")
    if top_k is not None and top_k < 1:
        raise OnnxcamError("--top-k must be at least 1")
    loaded = load_model(model)
    paths = collect_inputs(list(inputs))
    preprocessing = _preprocessing(loaded, _size(size), _floats(mean, "--mean"), _floats(std, "--std"),
                                   scale, layout, bgr)
    explainer = Explainer(loaded, list(node_specs) or ["auto"], provider=provider, grad_backend=grad_backend,
                          layout=layout or preprocessing.explainer_layout(loaded.input.rank),
                          probabilities=probabilities,
                          input_shape=preprocessing.probe_shape(loaded.input.shape), cache=not no_cache,
                          tokens_grid=parse_grid(tokens_grid), prefix_tokens=_prefix(prefix_tokens))
    methods = applicable_methods(explainer) if method == "all" else [get_method(method).name]
    class_names = read_labels(labels) if labels else loaded.class_names
    mask = read_mask(target_mask) if target_mask else None
    if mask is not None and target is None:
        raise OnnxcamError("--target-mask needs --target CLASS: the class whose logits the mask sums")
    options = dict(target=_target(target, class_names), target_mask=mask, class_names=class_names,
                   top_k=top_k, alpha=alpha, save_npy=npy, batch_size=batch_size,
                   overwrite=overwrite, max_channels=max_channels,
                   progress=_progress_printer("score-cam", "masked inputs"),
                   batch_progress=_progress_printer("explained", "inputs", minimum=2 * batch_size))
    if _detector(explainer, detection_format, detection_index, box, mask):
        from .detection_files import DetectionFileExplainer
        runner = DetectionFileExplainer(explainer, preprocessing, out_dir, methods, fmt=detection_format or "auto",
                                        detection_index=detection_index, box=_box(box), confidence=confidence,
                                        iou_threshold=iou_threshold, **options)
    else:
        runner = FileExplainer(explainer, preprocessing, out_dir, methods, **options)
    summaries = []
    for result in runner.run(paths):
        summaries.append(result.summary())
        if not as_json:
            name = f" ({result.class_name})" if result.class_name else ""
            rank = f" top{result.rank}" if top_k else ""
            found = getattr(result, "detection", None)
            rank += f" box {','.join(f'{v:g}' for v in found['box'])}" if found else ""
            click.echo(f"{result.path}: class {result.target}{name}{rank} score {result.score:.4f} "
                       f"node {','.join(result.nodes)} {result.method} {result.seconds * 1000:.1f} ms"
                       f" -> {', '.join(str(p) for p in result.written)}")
    if runner.skipped and not as_json:
        click.echo(f"skipped {runner.skipped} input(s) already explained in {out_dir} (use --overwrite)")
    if as_json:
        click.echo(json.dumps({"model": str(model), "backend": explainer.gradient_backend_used,
                               "skipped": runner.skipped, "results": summaries}, indent=2))


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
            return np.load(path, allow_pickle=False).astype(np.float32)
        except Exception as exc:
            raise OnnxcamError(f"--target-mask {path} is not a readable .npy array ({exc})") from exc
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


def _initializers(proto) -> set[str]:
    return {init.name for init in proto.graph.initializer}


def _target(text: str | None, class_names):
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    names = class_names or []
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise OnnxcamError(f"--target {text!r} is neither a class index nor a class name of this model")


def applicable_methods(explainer) -> list[str]:
    """Every method that can run on this model and node (for --method all)."""
    from .methods import METHODS
    chosen = []
    for name in METHODS:
        try:
            explainer.check_method(name)
        except OnnxcamError:
            continue
        chosen.append(name)
    return chosen


if __name__ == "__main__":
    main()
