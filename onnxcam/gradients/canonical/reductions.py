"""Sums, means and extremes: Sum/Mean as Add chains, max/min reductions and GlobalMaxPool as TopK (which
the builder differentiates), and Split as one Slice per part (its Split gradient breaks when a part
gets no gradient)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import helper

from ...graph import attribute
from . import Rewriter, _op, rewrite

def _add_chain(rw, node, inputs, out):
    if len(inputs) == 1:
        return [helper.make_node("Identity", inputs, [out], name=rw.name(node, "Identity"))]
    nodes, total = [], inputs[0]
    for i, term in enumerate(inputs[1:], start=1):
        last = i == len(inputs) - 1
        add, total = _op(rw, node, "Add", [total, term], f"partial{i}", outputs=[out] if last else None)
        nodes.append(add)
    return nodes


@rewrite("Sum")
def _sum(rw: Rewriter, node):
    return _add_chain(rw, node, list(node.input), node.output[0])


@rewrite("Mean")
def _mean(rw: Rewriter, node):
    total = rw.name(node, "total")
    nodes = _add_chain(rw, node, list(node.input), total)
    count = rw.const(node, "count", len(node.input), rw.dtype_of(node.input[0]))
    div, _ = _op(rw, node, "Div", [total, count], "", outputs=[node.output[0]])
    return nodes + [div]


def _max_over_axes(rw, node, x, axes, keepdims, out, largest=1):
    """max (or min) over ``axes`` as one TopK(k=1) per axis; the builder differentiates TopK."""
    k = rw.const(node, "k", [1], np.int64)
    nodes, current = [], x
    for i, axis in enumerate(axes):
        last = i == len(axes) - 1 and keepdims
        values = out if last else rw.name(node, f"max_axis{axis}")
        nodes.append(helper.make_node("TopK", [current, k], [values, rw.name(node, f"index_axis{axis}")],
                                      name=rw.name(node, "TopK"), axis=axis, largest=largest))
        current = values
    if not keepdims:
        nodes.append(rw.axes_op(node, "Squeeze", current, out, axes))
    return nodes


@rewrite("GlobalMaxPool")
def _global_max_pool(rw: Rewriter, node):
    rank = rw.rank(node.input[0])
    if rank is None or rank < 3:
        return None
    return _max_over_axes(rw, node, node.input[0], list(range(2, rank)), 1, node.output[0])


def _reduce_extreme(largest: int) -> Callable:
    def rule(rw: Rewriter, node):
        rank = rw.rank(node.input[0])
        axes = attribute(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = rw.constant(node.input[1])
            if axes is None:
                return None
        if rank is None:
            return None
        if axes is None or len(axes) == 0:
            if attribute(node, "noop_with_empty_axes", 0):
                return [helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                         name=rw.name(node, "Identity"))]
            axes = range(rank)
        axes = sorted({int(a) % rank for a in np.asarray(axes).reshape(-1)})
        return _max_over_axes(rw, node, node.input[0], axes, attribute(node, "keepdims", 1), node.output[0],
                              largest)
    return rule




rewrite("ReduceMax")(_reduce_extreme(1))
rewrite("ReduceMin")(_reduce_extreme(0))


@rewrite("Split")
def _split(rw: Rewriter, node):
    """Split -> one Slice per output: the builder's Split gradient breaks when a part gets no gradient."""
    axis = attribute(node, "axis", 0)
    sizes = attribute(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        sizes = rw.constant(node.input[1])
        if sizes is None:
            return None
    count = len(node.output)
    nodes: list = []
    if sizes is None:
        shape = rw.shape(node.input[0])
        dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if dim is not None:
            chunk = -(-dim // count)
            sizes = [min(chunk, dim - i * chunk) for i in range(count)]
    axes = rw.const(node, "axis", [axis], np.int64)
    if sizes is not None:
        offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
        bounds = [(rw.const(node, f"start{i}", [offsets[i]], np.int64),
                   rw.const(node, f"end{i}", [offsets[i + 1]], np.int64)) for i in range(count)]
    else:  # dimension known only at run time: chunk = ceil(dim / count), last part takes the rest
        s, shape_t = _op(rw, node, "Shape", [node.input[0]], "shape")
        g, dim_t = _op(rw, node, "Gather", [shape_t, axes], "dim", axis=0)
        a, dim_plus = _op(rw, node, "Add", [dim_t, rw.const(node, "count_minus_one", [count - 1], np.int64)],
                          "dim_plus")
        d, chunk_t = _op(rw, node, "Div", [dim_plus, rw.const(node, "count", [count], np.int64)], "chunk")
        nodes += [s, g, a, d]
        bounds = []
        for i in range(count):
            m, start = _op(rw, node, "Mul", [chunk_t, rw.const(node, f"index{i}", [i], np.int64)], f"start{i}")
            nodes.append(m)
            if i == count - 1:
                end = rw.const(node, "end_last", [np.iinfo(np.int64).max], np.int64)
            else:
                m2, end = _op(rw, node, "Mul", [chunk_t, rw.const(node, f"index{i + 1}", [i + 1], np.int64)],
                              f"end{i}")
                nodes.append(m2)
            bounds.append((start, end))
    for i, out in enumerate(node.output):
        if rw.used(out):
            nodes.append(helper.make_node("Slice", [node.input[0], bounds[i][0], bounds[i][1], axes], [out],
                                          name=rw.name(node, f"Slice{i}")))
    return nodes
