"""Flags and flag parsing shared by the commands: preprocessing, model I/O (which input, feeds, which
output), the Explainer options, labels, masks, targets, progress lines."""
from __future__ import annotations

import re
import sys
from dataclasses import replace

import click

from ..errors import OnnxcamError
from ..methods import METHODS
import functools
from pathlib import Path


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
    from .. import layouts
    channels_first = (layouts.normalize_layout(layout) or layouts.input_layout(shape)) == layouts.FIRST
    channels = shape[1] if channels_first else shape[-1]
    if not isinstance(channels, int) or channels <= 0:
        raise OnnxcamError(f"the channel axis of input {loaded.input.name} is symbolic; onnxcam cannot guess "
                           "the probe shape")
    return (1, channels, *values) if channels_first else (1, *values, channels)


def _preprocessing(model, size, mean, std, scale, layout, bgr, preset=None):
    from ..preprocess import Preprocessing
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
    from ..explainer import Explainer
    return Explainer(loaded, list(node_specs) or ["auto"], **_explainer_options(loaded, preprocessing, *flags))


def _progress_printer(label: str, unit: str, minimum: int = PROGRESS_MIN_TOTAL):
    """A progress line for long runs, drawn on stderr when it is a terminal (stdout stays clean)."""
    if not sys.stderr.isatty():
        return None

    def progress(done: int, total: int):
        if total >= minimum:
            click.echo(f"\r{label}: {done}/{total} {unit}", err=True, nl=done >= total)
    return progress


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

    from ..preprocess import read_image
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


def scored_model_options(command):
    """Add --input, --feed, --output and --class-axis (which input and output of the model) to a click
    command."""
    options = [
        click.option("--input", "input_name", metavar="NAME",
                     help="Multi-input models: the input to explain (default: the only float input with "
                          "spatial axes)."),
        click.option("--feed", "feed_specs", multiple=True, metavar="NAME=FILE.npy",
                     help="Multi-input models: the value of another input, one sample (repeated for every "
                          "input) or one row per input. Repeat for each other input."),
        click.option("--output", "output_name", metavar="NAME",
                     help="The output to score (default: the first; the input of its Softmax unless "
                          "--probabilities)."),
        click.option("--class-axis", type=int, metavar="AXIS",
                     help="The class axis of the scored output, counted in its own shape (default: "
                          "detected: 1 for N,K,H,W maps, the last axis for sequences N,T,K or T,N,K)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def model_io_options(command):
    """scored_model_options plus --preset (the preprocessing of the images fed)."""
    preset = click.option("--preset", type=click.Choice(["imagenet", "tf", "caffe", "paddle", "raw", "unit"],
                                                        case_sensitive=False),
                          help="Preprocessing convention (see README): imagenet mean/std, tf [-1,1], caffe BGR "
                               "mean-subtracted, paddle (x/255-0.5)/0.5, raw 0-255, unit 0-1. --mean/--std/"
                               "--scale/--bgr given with it win.")
    return scored_model_options(preset(command))


def read_feeds(specs: tuple[str, ...]) -> dict:
    """``NAME=FILE.npy`` pairs as arrays (no pickles)."""
    import numpy as np

    feeds = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise OnnxcamError(f"--feed {spec!r} must be NAME=FILE.npy")
        if name in feeds:
            raise OnnxcamError(f"--feed {name} is given twice; give each input once")
        if not Path(path).is_file():
            raise OnnxcamError(f"--feed {name}: {path} is not a file; give a .npy array")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise OnnxcamError(f"--feed {name}: {path} is not a readable .npy array ({type(exc).__name__})") \
                from None
    return feeds


def token_options(command):
    """--tokens-grid and --prefix-tokens (transformer token nodes), shared by explain and nodes."""
    command = click.option("--prefix-tokens", type=int,
                           help="Transformer token nodes: class/distillation/register tokens before the patch "
                                "tokens, dropped (default: guessed).")(command)
    return click.option("--tokens-grid", help="Transformer token nodes (N,T,C): the patch grid HEIGHT,WIDTH "
                                              "(default: guessed from the input size and the token count)."
                        )(command)


def _prefix(count: int | None) -> int | None:
    if count is not None and count < 0:
        raise OnnxcamError("--prefix-tokens must be 0 or more")
    return count
