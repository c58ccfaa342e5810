"""The command-line flags that say how a model is fed and read: which input is explained, what the
other inputs get, which output is scored and where its classes are, and the preprocessing preset.
Shared by every command that runs a model (explain, export-augmented, nodes)."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from .errors import OnnxcamError


def model_io_options(command):
    """Add --input, --feed, --output, --class-axis and --preset to a click command."""
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
        click.option("--preset", type=click.Choice(["imagenet", "tf", "caffe", "paddle", "raw", "unit"],
                                                    case_sensitive=False),
                     help="Preprocessing convention (see README): imagenet mean/std, tf [-1,1], caffe BGR "
                          "mean-subtracted, paddle (x/255-0.5)/0.5, raw 0-255, unit 0-1. --mean/--std/"
                          "--scale/--bgr given with it win."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


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
