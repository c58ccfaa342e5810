"""What a run is fed: the explained batch (checked against the model's input), the other inputs, the
probe shapes that measure the layers, and runs in pieces of a model's fixed batch.

A model may take several inputs (a signal and its sampling mask, an image and its metadata): onnxcam
explains one of them and feeds the others as given (``--feed NAME=FILE.npy``, API ``feeds={...}``),
one sample that is repeated for every row of the batch, or one row per sample.

A model exported with a static batch (often 1, as torch's dynamo exporter does by default) still
explains a batch of any size: every run is cut into pieces of the model's batch, the last piece padded
with copies of its last row, and the results put back together without the padding.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from onnx import helper

from . import layouts
from .errors import OnnxcamError, shape_text
from .model import LoadedModel, TensorSpec
from .preprocess import Preprocessing


def checked_input(x, spec: TensorSpec) -> np.ndarray:
    """``x`` as a contiguous float32 batch of the model's rank whose static dims match ``spec``; a
    one-line error saying what to fix otherwise."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise OnnxcamError(f"input must be a numeric array, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise OnnxcamError("input holds NaN or infinite values (or values beyond float32); "
                           "replace them before explaining")
    shape = spec.shape
    if shape is not None:
        if x.ndim != len(shape):
            raise OnnxcamError(f"input has shape {x.shape} but the model takes rank {len(shape)} "
                               f"{shape_text(shape)}; add the batch axis / fix the layout")
        for axis, (got, want) in enumerate(zip(x.shape, shape)):
            if axis > 0 and isinstance(want, int) and want > 0 and got != want:
                raise OnnxcamError(f"input has shape {x.shape} but the model takes "
                                   f"{shape_text(shape)}; resize the input (--size) or fix --layout")
    if x.shape[0] == 0:
        raise OnnxcamError("the input batch is empty")
    return x


def probe_shapes(model: LoadedModel, feeds: "InputFeeds", input_layout: str,
                 input_shape: tuple | None) -> tuple[tuple | None, dict[str, tuple] | None]:
    """(the explained input's batch-1 probe shape, the shapes of every input for the probe run that
    measures the layers), or None where unknown: ``input_shape`` when given, else the model's static
    shape, else (images) the size its preprocessing metadata names."""
    explained = _explained_probe_shape(model, input_layout, input_shape)
    others = {name: (1, *array.shape[1:]) for name, array in feeds.arrays.items()}
    if explained is None:
        return None, others or None
    return explained, {model.input.name: explained, **others}


def _explained_probe_shape(model: LoadedModel, input_layout: str, input_shape: tuple | None) -> tuple | None:
    spec = model.input
    if input_shape is not None:
        return tuple(input_shape)
    if spec.shape is None:
        return None
    dims = [1 if i == 0 else d for i, d in enumerate(spec.shape)]
    if all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    if len(dims) != 4:
        return None
    layout = "NCHW" if input_layout == layouts.FIRST else "NHWC"
    preprocessing = replace(Preprocessing.from_metadata(model.preprocess, spec.shape), layout=layout)
    return preprocessing.probe_shape(spec.shape)


def _spec_text(spec: TensorSpec) -> str:
    return f"{spec.name} {shape_text(spec.shape)}"


class InputFeeds:
    """The model's other inputs, checked once, handed out for a batch of n samples."""

    def __init__(self, model: LoadedModel, feeds: dict | None):
        others = [spec for spec in model.inputs if spec.name != model.input.name]
        feeds = dict(feeds or {})
        unknown = sorted(set(feeds) - {spec.name for spec in others})
        if unknown:
            known = ", ".join(_spec_text(s) for s in others) or "none"
            raise OnnxcamError(f"--feed {unknown[0]}: the model has no other input of that name "
                               f"(explained input: {_spec_text(model.input)}; others: {known})")
        missing = [spec for spec in others if spec.name not in feeds]
        if missing:
            listing = ", ".join(_spec_text(s) for s in missing)
            raise OnnxcamError(f"the model also takes {listing} besides the explained input "
                               f"{model.input.name!r}; give each with --feed NAME=FILE.npy (API: feeds={{...}}) "
                               "or choose another input to explain with --input NAME")
        self.arrays: dict[str, np.ndarray] = {}
        for spec in others:
            self.arrays[spec.name] = _with_batch_axis(spec, feeds[spec.name])
        batch = model.input.shape[0] if model.input.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def for_batch(self, n: int, sample: int | None = None) -> dict[str, np.ndarray]:
        """Each other input for n samples: its single row repeated, or its n rows; with ``sample``, n
        copies of that sample's row (Score-CAM's masked copies of one input)."""
        out = {}
        for name, array in self.arrays.items():
            if sample is not None:
                out[name] = np.repeat(array[sample if array.shape[0] > 1 else 0][None], n, axis=0)
            elif array.shape[0] == n:
                out[name] = array
            elif array.shape[0] == 1:
                out[name] = np.repeat(array, n, axis=0)
            else:
                raise OnnxcamError(f"--feed {name} has {array.shape[0]} rows for a batch of {n}; give one "
                                   "sample (repeated for every input) or one row per input")
        return out


def _with_batch_axis(spec: TensorSpec, value) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(spec.elem_type) if spec.elem_type else np.float32
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise OnnxcamError(f"--feed {spec.name} must be a numeric array, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise OnnxcamError(f"--feed {spec.name} contains NaN or infinite values")
    if spec.rank is not None and array.ndim == spec.rank - 1:
        array = array[None]
    if spec.rank is not None and array.ndim != spec.rank:
        raise OnnxcamError(f"--feed {spec.name} has shape {array.shape} but the input is "
                           f"{shape_text(spec.shape)}; give one sample or a batch of that shape")
    return np.ascontiguousarray(array, dtype=dtype)


def run_in_pieces(run: Callable[[dict], list[np.ndarray]], batched: dict[str, tuple[np.ndarray, int]],
                  out_axes: list[int], fixed_batch: int | None) -> list[np.ndarray]:
    """``run(feeds)`` over batch-sized feeds; with a fixed model batch B, in pieces of B rows.

    ``batched``: name -> (array, its batch axis); ``out_axes``: the batch axis of each output."""
    n = next(iter(batched.values()))[0].shape[next(iter(batched.values()))[1]]
    if fixed_batch is None or n == fixed_batch:
        return run({name: array for name, (array, _) in batched.items()})
    pieces = []
    for lo in range(0, n, fixed_batch):
        size = min(fixed_batch, n - lo)
        feeds = {}
        for name, (array, axis) in batched.items():
            part = np.take(array, np.arange(lo, lo + size), axis=axis)
            if size < fixed_batch:   # pad with copies of the last row: results for them are dropped
                pad = np.repeat(np.take(part, [size - 1], axis=axis), fixed_batch - size, axis=axis)
                part = np.concatenate([part, pad], axis=axis)
            feeds[name] = np.ascontiguousarray(part)
        outputs = run(feeds)
        pieces.append([np.take(out, np.arange(size), axis=axis) for out, axis in zip(outputs, out_axes)])
    return [np.concatenate([p[i] for p in pieces], axis=out_axes[i]) for i in range(len(out_axes))]
