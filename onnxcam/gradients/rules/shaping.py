"""Rules for ops that move elements around: reshapes, Transpose, Concat/Split, Slice, Gather, Pad."""
from __future__ import annotations

import numpy as np

from . import rule
from .base import Emitter, Unsupported, node_attrs

BIG = np.iinfo(np.int64).max


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze", integer=True)
def reshape(e: Emitter, node, gy, need):
    return [e.reshape_like(gy[0], node.input[0])] + [None] * (len(node.input) - 1)


@rule("Transpose", integer=True)
def transpose(e: Emitter, node, gy, need):
    perm = node_attrs(node).get("perm") or list(reversed(range(e.rank(node.input[0]))))
    return [e.op("Transpose", [gy[0]], perm=[int(i) for i in np.argsort(perm)])]


def _slice(e: Emitter, x: str, starts, ends, axes) -> str:
    return e.op("Slice", [x, starts, ends, axes])


@rule("Concat")
def concat(e: Emitter, node, gy, need):
    rank = e.rank(node.output[0])
    axis = node_attrs(node)["axis"] % rank
    sizes = [(e.shape(i) or [None] * rank)[axis] for i in node.input]
    out = []
    if all(isinstance(s, int) for s in sizes):
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for k, name in enumerate(node.input):
            out.append(_slice(e, gy[0], e.ints([offsets[k]]), e.ints([offsets[k + 1]]), e.ints([axis]))
                       if need[k] else None)
        return out
    start = e.ints([0])
    for k, name in enumerate(node.input):
        size = e.op("Slice", [e.shape_of(name), e.ints([axis]), e.ints([axis + 1])])
        end = e.op("Add", [start, size])
        out.append(_slice(e, gy[0], start, end, e.ints([axis])) if need[k] else None)
        start = end
    return out


@rule("Split")
def split(e: Emitter, node, gy, need):
    axis = node_attrs(node).get("axis", 0)
    parts = [g if g is not None else e.zeros_like(o) for g, o in zip(gy, node.output)]
    return [e.op("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


@rule("Slice")
def slice_(e: Emitter, node, gy, need):
    if e.opset < 10:
        raise Unsupported("opset < 10 Slice")
    x = node.input[0]
    rank = e.rank(x)
    values = [e.required_value(node.input[k], "Slice starts/ends/axes/steps")
              if len(node.input) > k and node.input[k] else None for k in range(1, 5)]
    starts, ends = values[0].reshape(-1), values[1].reshape(-1)
    axes = values[2].reshape(-1) if values[2] is not None else np.arange(len(starts))
    steps = values[3].reshape(-1) if values[3] is not None else np.ones(len(starts), np.int64)
    g = gy[0]
    pads = [0] * (2 * rank)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        dim = e.static_dims(x, [axis])[0]
        positions = list(range(*slice(int(start), int(end), int(step)).indices(dim)))
        if not positions:
            return [e.zeros_like(x)] + [None] * (len(node.input) - 1)
        stride = abs(int(step))
        if step < 0:  # undo the reversal: positions now ascend
            g = e.op("Slice", [g, e.ints([-1]), e.ints([-BIG]), e.ints([axis]), e.ints([-1])])
        if stride > 1 and len(positions) > 1:  # put (stride - 1) zeros after every element
            g = _interleave_zeros(e, g, axis, rank, len(positions), stride)
        first = min(positions)
        covered = (len(positions) - 1) * stride + 1
        pads[axis], pads[rank + axis] = first, dim - first - covered
    return [e.op("Pad", [g, e.ints(pads)])] + [None] * (len(node.input) - 1)


def _interleave_zeros(e: Emitter, g: str, axis: int, rank: int, count: int, stride: int) -> str:
    shape = e.op("Shape", [g])
    widened = e.unsqueeze(g, [axis + 1])
    pads = [0] * (2 * (rank + 1))
    pads[rank + 1 + axis + 1] = stride - 1
    padded = e.op("Pad", [widened, e.ints(pads)])
    new_shape = e.op("Concat", [e.op("Slice", [shape, e.ints([0]), e.ints([axis])]), e.ints([count * stride]),
                                e.op("Slice", [shape, e.ints([axis + 1]), e.ints([BIG])])], axis=0)
    merged = e.op("Reshape", [padded, new_shape])
    return e.op("Slice", [merged, e.ints([0]), e.ints([(count - 1) * stride + 1]), e.ints([axis])])


@rule("Gather")
def gather(e: Emitter, node, gy, need):
    x, idx_name = node.input
    rank = e.rank(x)
    axis = node_attrs(node).get("axis", 0) % rank
    dim = e.static_dims(x, [axis])[0]
    indices = e.required_value(idx_name, "Gather indices")
    indices = np.where(indices < 0, indices + dim, indices).astype(np.int64)
    g = gy[0]
    if indices.ndim == 0:  # x[..., i, ...]: put the slice back with zero padding
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = int(indices), dim - 1 - int(indices)
        return [e.op("Pad", [e.unsqueeze(g, [axis]), e.ints(pads)]), None]
    q = indices.size
    if indices.ndim != 1:
        shape = e.op("Shape", [g])
        flat_shape = e.op("Concat", [e.op("Slice", [shape, e.ints([0]), e.ints([axis])]), e.ints([q]),
                                     e.op("Slice", [shape, e.ints([axis + indices.ndim]), e.ints([BIG])])],
                          axis=0)
        g = e.op("Reshape", [g, flat_shape])
    one_hot = np.zeros((q, dim))
    np.add.at(one_hot, (np.arange(q), indices.reshape(-1)), 1.0)  # repeated indices add up
    perm = [i for i in range(rank) if i != axis] + [axis]
    last = g if axis == rank - 1 else e.op("Transpose", [g], perm=perm)
    summed = e.op("MatMul", [last, e.array(one_hot, x)])
    gx = summed if axis == rank - 1 else e.op("Transpose", [summed], perm=[int(i) for i in np.argsort(perm)])
    return [gx, None]


@rule("Pad")
def pad(e: Emitter, node, gy, need):
    a = node_attrs(node)
    if a.get("mode", "constant") != "constant":
        raise Unsupported(f"mode={a.get('mode')!r} (only constant padding)")
    if any(need[1:]):
        raise Unsupported("gradient with respect to the pad value")
    x = node.input[0]
    rank = e.rank(x)
    if e.opset < 11:
        pads = np.asarray(a["pads"])
    else:
        pads = e.required_value(node.input[1], "Pad pads").reshape(-1)
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(v) % rank for v in e.required_value(node.input[3], "Pad axes").reshape(-1)]
    begin, end = [0] * rank, [0] * rank
    for k, axis in enumerate(axes):
        begin[axis], end[axis] = int(pads[k]), int(pads[len(axes) + k])
    starts = [max(b, 0) for b in begin]
    ends = [-p if p > 0 else BIG for p in end]
    g = _slice(e, gy[0], e.ints(starts), e.ints(ends), e.ints(range(rank)))
    crops = [max(-b, 0) for b in begin] + [max(-p, 0) for p in end]
    if any(crops):
        g = e.op("Pad", [g, e.ints(crops)])
    return [g] + [None] * (len(node.input) - 1)
