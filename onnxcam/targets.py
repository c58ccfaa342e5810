"""What is scored: which output, where its batch and class axes are, and the target weights W.

The score head computes ``score = Σ output · W`` over one output tensor. Internally onnxcam reads that
output in a canonical order ``(N, K, *positions)``: batch axis first, class axis second, every other
axis a position axis (time steps of a sequence, pixels of a map). Exporters do not all agree on that
order: an LSTM exported time-major gives ``(T, N, K)``, a text recogniser ``(N, T, K)``, a segmenter
``(N, K, H, W)``. ``ScoredOutput`` knows the output's own axes and converts both ways.

Axes are found as follows. The batch axis is the output axis that carries the input's symbolic batch
dim, else the one whose size follows the batch size between two probe runs, else axis 0. The class
axis, unless given (``--class-axis``), is the other axis of a 2-D output; axis 1 of a batch-first
output with the input's rank and a channels-first input (a map, N x K x H x W); else the last axis
(sequences: N x T x K or T x N x K).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import layouts
from .errors import OnnxcamError, shape_text


@dataclass(frozen=True)
class ScoredOutput:
    name: str
    rank: int
    batch_axis: int
    class_axis: int

    @property
    def is_classifier(self) -> bool:
        """(N, K) with the batch first: the score head picks the arg-max class inside the graph."""
        return self.rank == 2 and self.batch_axis == 0

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """The output in (N, K, *positions) order."""
        return np.moveaxis(array, (self.batch_axis, self.class_axis), (0, 1))

    def own(self, array: np.ndarray) -> np.ndarray:
        """A canonical (N, K, *positions) array back in the output's own axis order."""
        return np.ascontiguousarray(np.moveaxis(array, (0, 1), (self.batch_axis, self.class_axis)))


def locate_axes(name: str, declared: tuple | None, input_shape: tuple | None, input_layout: str,
                probe: Callable[[int], tuple], class_axis: int | None = None) -> ScoredOutput:
    """The scored output's axes (see the module docstring). ``declared``: its dims from the graph
    (int, symbol or None); ``probe(n)``: the output's shape for a batch of n (runs the model)."""
    batch_symbol = input_shape[0] if input_shape and isinstance(input_shape[0], str) else None
    fixed_batch = input_shape is not None and isinstance(input_shape[0], int) and input_shape[0] > 0
    shape_1 = tuple(declared) if declared is not None else probe(1)
    rank = len(shape_1)
    if rank < 1:
        raise OnnxcamError(f"output {name!r} is a scalar; score an output with a batch axis (--output NAME)")
    batch_axis = None
    if declared is not None and batch_symbol is not None:
        carrying = [i for i, d in enumerate(declared) if d == batch_symbol]
        batch_axis = carrying[0] if len(carrying) == 1 else None
    if batch_axis is None and rank > 1 and not fixed_batch and not (declared and declared[0] == batch_symbol):
        shape_1, shape_2 = probe(1), probe(2)
        grown = [i for i, (a, b) in enumerate(zip(shape_1, shape_2)) if (a, b) == (1, 2)]
        batch_axis = grown[0] if len(grown) == 1 else None
    if batch_axis is None:
        batch_axis = 0
    if class_axis is None:
        if rank == 1:
            raise OnnxcamError(f"output {name!r} has shape {shape_text(shape_1)}: no class axis beside the "
                               "batch; score another output (--output NAME)")
        if rank == 2:
            class_axis = 1 - batch_axis
        elif batch_axis == 0 and input_shape is not None and rank == len(input_shape) \
                and input_layout == layouts.FIRST:
            class_axis = 1
        else:
            class_axis = rank - 1
    else:
        if not -rank <= class_axis < rank:
            raise OnnxcamError(f"--class-axis {class_axis} is out of range for output {name!r} of shape "
                               f"{shape_text(shape_1)}")
        class_axis %= rank
        if class_axis == batch_axis:
            raise OnnxcamError(f"--class-axis {class_axis} is the batch axis of output {name!r} "
                               f"{shape_text(shape_1)}; give the axis that holds the classes")
    return ScoredOutput(name, rank, batch_axis, class_axis)


def checked_targets(targets, n: int, num_classes: int) -> np.ndarray | None:
    """One class index per sample (an int is repeated), each in range."""
    if targets is None:
        return None
    array = np.atleast_1d(np.asarray(targets))
    if array.dtype.kind not in "iu":
        raise OnnxcamError(f"targets must be class indices (integers), got {targets!r}")
    if array.size == 1 and n > 1:
        array = np.repeat(array, n)
    if array.shape != (n,):
        raise OnnxcamError(f"got {array.size} targets for {n} inputs; give one class or one per input")
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise OnnxcamError(f"target class {int(bad[0])} is out of range: the model has {num_classes} "
                           f"classes (0-{num_classes - 1})")
    return array.astype(np.int64)


def target_weights(shape: tuple, targets: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray:
    """Canonical W (N, K, *positions): zero rows (arg-max, classifiers only) or one-hot rows; with
    positions, the target class's plane holds the mask (or ones)."""
    weights = np.zeros(shape, np.float32)
    n = shape[0]
    if len(shape) == 2:
        if mask is not None:
            raise OnnxcamError("--target-mask applies to outputs with positions (maps, sequences); "
                               f"this model outputs {tuple(shape)} (batch, classes)")
        if targets is not None:
            weights[np.arange(n), targets] = 1.0
        return weights
    positions = tuple(shape[2:])
    if targets is None:
        raise OnnxcamError(f"the scored output has positions besides its classes ({shape_text(shape)} as batch, "
                           "classes, positions); say which class to explain with --target (and optionally "
                           "--target-mask over the positions)")
    plane = np.ones(positions, np.float32)
    if mask is not None:
        if mask.shape not in (positions, (n, *positions)):
            raise OnnxcamError(f"--target-mask has shape {mask.shape} but the model's output map is "
                               f"{positions}; give a mask of that size")
        plane = mask
    weights[np.arange(n), targets] = plane
    return weights
