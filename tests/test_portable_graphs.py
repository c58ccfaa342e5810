"""Portable gradients through whole graphs: fan-out, accumulation, integer shape paths
(finite differences; the torch-exported conv net is in test_portable_torch.py)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from gradient_checks import finite_differences, gradients, graph_model, rand, session

from onnxcam.gradients import gradient_name, portable


def cut_at(model: onnx.ModelProto, tensor: str, value: np.ndarray) -> onnx.ModelProto:
    """The same model with ``tensor`` turned into a graph input (its producers dropped if unused)."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    nodes = [n for n in cut.graph.node if tensor not in n.output]
    needed, kept = {o.name for o in cut.graph.output}, []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    del cut.graph.node[:]
    cut.graph.node.extend(reversed(kept))
    cut.graph.input.append(h.make_tensor_value_info(tensor, TensorProto.DOUBLE, value.shape))
    return cut


def test_fan_out_accumulates_and_intermediate_wrt():
    """a feeds four consumers (one of them twice); wrt both x and a = f(x): d/dx is the total derivative."""
    x = rand(2, 3)
    nodes = [
        h.make_node("Tanh", ["x"], ["a"]),
        h.make_node("Mul", ["a", "a"], ["sq"]),
        h.make_node("Sigmoid", ["a"], ["s"]),
        h.make_node("Add", ["sq", "s"], ["t"]),
        h.make_node("Concat", ["t", "a"], ["cat"], axis=1),
        h.make_node("Mul", ["cat", "cat"], ["y0"]),
        h.make_node("Concat", ["x", "x"], ["xx"], axis=1),
        h.make_node("Sub", ["y0", "xx"], ["y"]),
    ]
    model = graph_model(nodes, {"x": x})
    gx, ga = gradients(model, {"x": x}, ["x", "a"])
    np.testing.assert_allclose(gx, finite_differences(model, {"x": x}, "x", 1e-6), rtol=1e-6, atol=1e-9)
    a = np.tanh(x)
    cut = cut_at(model, "a", a)
    np.testing.assert_allclose(ga, finite_differences(cut, {"x": x, "a": a}, "a", 1e-6), rtol=1e-6, atol=1e-9)


def test_integer_shape_path_is_constant():
    """Shape -> Gather -> Concat -> Reshape: the shape arithmetic is int64 and is not differentiated."""
    x = rand(2, 3, 4)
    consts = {"zero": np.array(0, np.int64), "rest": np.array([-1], np.int64), "axes": np.array([0], np.int64)}
    nodes = [
        h.make_node("Relu", ["x"], ["r"]),
        h.make_node("Shape", ["r"], ["shape"]),
        h.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        h.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        h.make_node("Concat", ["n1", "rest"], ["target"], axis=0),
        h.make_node("Reshape", ["r", "target"], ["flat"]),
        h.make_node("Softmax", ["flat"], ["p"], axis=1),
        h.make_node("Mul", ["p", "flat"], ["y"]),
        h.make_node("Mul", ["y", "y"], ["y2"]),
        h.make_node("ReduceSum", ["y2"], ["score"], keepdims=0),
    ]
    model = graph_model(nodes, {"x": x}, consts, outputs=("y",), score_of=None)
    model.graph.output.append(h.make_tensor_value_info("score", TensorProto.DOUBLE, []))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    built = portable.build(model, "score", ["x"])
    onnx.checker.check_model(built, full_check=True)
    for batch in (2, 3):  # the batch size is read at run time, not baked into the backward graph
        xb = rand(batch, 3, 4, seed=batch)
        xb = np.where(np.abs(xb) < 0.05, 0.1, xb)
        (g,) = session(built).run([gradient_name("x")], {"x": xb})
        np.testing.assert_allclose(g, finite_differences(model, {"x": xb}, "x", 1e-6), rtol=1e-6, atol=1e-9)
