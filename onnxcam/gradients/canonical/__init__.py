"""Rewrite ops that onnxruntime-training's gradient builder cannot differentiate into equivalent ones.

ONNX Runtime 1.19.2's GradientGraphBuilder has no gradient for inference BatchNormalization, Dropout
without a mask, HardSigmoid/HardSwish, PRelu, Elu, Selu, Softplus, Mish, Sum, Mean, GlobalMaxPool,
ReduceMax/ReduceMin and InstanceNormalization; its Split gradient is wrong when one part carries no
gradient; it fails on LayerNormalization without its optional outputs or sharing its weights with another
node, and on a node that reads the same tensor twice (Concat(a, a), Where(c, a, a)); its Resize gradient
has no CPU kernel. Each rewrite below
computes the same function (outputs equal to float rounding) with ops the builder does differentiate.

Only the top-level graph is rewritten. Nothing here imports onnxruntime. One module per op family,
each rewrite one function registered with ``@rewrite("Op")``, as the portable rules are: a rewrite
returns the replacement nodes, or None to keep the node. Rewrites learn about the graph from the
model's GraphView and take their names and constants from a GraphBuilder, through ``Rewriter``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...graph import GraphBuilder, GraphView, copy_model, is_default_domain, subgraph_inputs

PREFIX = "onnxcam_canon/"
REWRITES: dict[str, Callable] = {}


def rewrite(*op_types: str):
    def register(fn):
        for op_type in op_types:
            REWRITES[op_type] = fn
        return fn
    return register


def canonicalize_for_gradients(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a new model whose top-level graph uses only ops the ORT gradient builder handles."""
    result = copy_model(model)
    rewriter = Rewriter(GraphView(result))
    new_nodes: list[onnx.NodeProto] = []
    for original in result.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # detached from the graph that is rebuilt below
        rule = REWRITES.get(node.op_type) if is_default_domain(node) else None
        replacement = rule(rewriter, node) if rule else None
        new_nodes.extend([node] if replacement is None else replacement)
    new_nodes = _copy_repeated_inputs(rewriter, new_nodes)
    del result.graph.node[:]
    result.graph.node.extend(new_nodes)
    result.graph.initializer.extend(rewriter.builder.initializers)
    _drop_unused_initializers(result.graph)
    return result


class Rewriter:
    """What the rewrites need to know about the graph (from its GraphView), and where their names and
    constants come from (one GraphBuilder)."""

    def __init__(self, view: GraphView):
        self.view = view
        self.opset = view.opset
        self.builder = GraphBuilder(view.names(), PREFIX, view.opset)
        self.readers = {name: len(users) for name, users in view.consumers.items()}
        self.consumed = set(view.consumers) | set(view.output_names)

    def name(self, node: onnx.NodeProto, what: str) -> str:
        return self.builder.fresh(f"{node.name or node.output[0]}/{what}")

    def const(self, node: onnx.NodeProto, what: str, value, dtype=None) -> str:
        name = self.name(node, what)
        self.builder.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def constant(self, name: str) -> np.ndarray | None:
        return self.view.constant(name) if name else None

    def shape(self, name: str) -> list | None:
        """Dims (int, or None when unknown) of a tensor, or None when even the rank is unknown."""
        shape = self.view.static_shape(name)
        return None if shape is None else list(shape)

    def rank(self, name: str) -> int | None:
        return self.view.rank(name)

    def dtype_of(self, name: str):
        elem = self.view.elem_type(name)
        return helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32

    def used(self, name: str) -> bool:
        return bool(name) and name in self.consumed

    def axes_op(self, node, op: str, data: str, out: str, axes, **attrs) -> onnx.NodeProto:
        """``op(data)`` over ``axes`` into ``out``, as the opset wants, named after ``node``."""
        b = self.builder
        b.axes_op(op, data, axes, outputs=[out], **attrs)
        made = b.nodes.pop()
        made.name = self.name(node, op)
        return made


def _op(rw: Rewriter, node, op: str, inputs: list[str], what: str, outputs=None, **attrs):
    """A new node named after ``node``; returns (node, its first output)."""
    outs = outputs or [rw.name(node, what)]
    return helper.make_node(op, inputs, outs, name=rw.name(node, op), **attrs), outs[0]



def _channel_shape_for(rw: Rewriter, node, data: str, values: str, nodes: list) -> str | None:
    """Reshape per-channel ``values`` (C,) to broadcast against ``data`` (N, C, *S)."""
    rank = rw.rank(data)
    if rank is not None:
        target = rw.const(node, "channel_shape", [-1] + [1] * max(rank - 2, 0), np.int64)
    else:  # rank known only at run time: [-1, 1, ..., 1] built from Shape(Shape(data))
        n, shape = _op(rw, node, "Shape", [data], "shape")
        m, rank_t = _op(rw, node, "Shape", [shape], "rank")
        s, spatial = _op(rw, node, "Sub", [rank_t, rw.const(node, "two", [2], np.int64)], "spatial_rank")
        o, ones = _op(rw, node, "ConstantOfShape", [spatial], "ones",
                      value=numpy_helper.from_array(np.array([1], np.int64)))
        c, target = _op(rw, node, "Concat", [rw.const(node, "minus_one", [-1], np.int64), ones],
                        "channel_shape", axis=0)
        nodes += [n, m, s, o, c]
    r, reshaped = _op(rw, node, "Reshape", [values, target], "per_channel")
    nodes.append(r)
    return reshaped


def _copy_repeated_inputs(rw: Rewriter, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """A node reading one tensor twice gets an Identity copy for the second read (builder quirk)."""
    result = []
    for node in nodes:
        seen: set[str] = set()
        for i, name in enumerate(node.input):
            if name and name in seen:
                identity, copy = _op(rw, node, "Identity", [name], f"copy_of_input{i}")
                result.append(identity)
                node.input[i] = copy
            seen.add(name)
        result.append(node)
    return result


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {o.name for o in graph.output} | {i.name for i in graph.input}
    for node in graph.node:
        used.update(node.input)
        used.update(subgraph_inputs(node))
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


from . import activations, normalization, reductions, resize  # noqa: E402,F401
