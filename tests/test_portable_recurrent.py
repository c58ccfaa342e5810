"""The LSTM, GRU and RNN rules against central finite differences (helpers in gradient_checks.py).

Tiny graphs: the recurrent node, then y = its outputs flattened and concatenated, score = sum(y * R).
ONNX Runtime runs the three ops in float32 only (LSTM and GRU load in float64 but refuse to run), so
the checks use eps 1e-3 and the float32 tolerances of assert_gradients_match (1 %, 3e-3 absolute).
Measured over the finite-difference cases here: max |analytic - fd| / max(1, max |fd|) = 5.5e-4, the
float32 rounding of the differences; the torch tests (test_recurrent_torch.py) check the same rules
within 1e-5 relative.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper as h

from onnxcam.errors import OnnxcamError
from onnxcam.gradients import gradient_name, portable

from gradient_checks import F32, assert_gradients_match, finite_differences, gradients, graph_model, rand, session

T, N, I, H = 3, 2, 2, 3
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SOURCES = {"LSTM": ["Y", "Y_h", "Y_c"], "GRU": ["Y", "Y_h"], "RNN": ["Y", "Y_h"]}


def recurrent_case(op, direction="forward", states=False, lens=None, layout=0, sources=None, attrs=None,
                   bias=True):
    """(nodes, inputs, consts, wrt) for one recurrent node scored through the chosen outputs."""
    dtype = F32
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    consts = {"W": rand(dirs, g * H, I, seed=1, dtype=dtype), "R": rand(dirs, g * H, H, seed=2, dtype=dtype)}
    inputs = {"x": rand(*((N, T, I) if layout else (T, N, I)), seed=3, dtype=dtype)}
    names = ["x", "W", "R", "", "", "", ""]
    if bias:
        consts["B"] = rand(dirs, 2 * g * H, seed=4, dtype=dtype) * 0.5
        names[3] = "B"
    if lens is not None:
        consts["lens"] = np.asarray(lens, np.int32)
        names[4] = "lens"
    wrt = ["x"]
    if states:
        state = (N, dirs, H) if layout else (dirs, N, H)
        inputs["h0"] = rand(*state, seed=5, dtype=dtype)
        names[5] = "h0"
        wrt.append("h0")
        if op == "LSTM":
            inputs["c0"] = rand(*state, seed=6, dtype=dtype)
            names[6] = "c0"
            wrt.append("c0")
    while names[-1] == "":
        names.pop()
    outputs = SOURCES[op]
    chosen = sources or outputs
    node = h.make_node(op, names, outputs, hidden_size=H, direction=direction, **(attrs or {}))
    if layout:  # the attribute exists from opset 14 on
        node.attribute.append(h.make_attribute("layout", layout))
    flat = [h.make_node("Reshape", [s, "minus_one"], [s + "_flat"]) for s in chosen]
    consts["minus_one"] = np.array([-1], np.int64)
    cat = h.make_node("Concat", [s + "_flat" for s in chosen], ["y"], axis=0)
    return [node] + flat + [cat], inputs, consts, wrt


CASES = [(op, attrs) for op, attrs in
         [("LSTM", {}), ("GRU", {"linear_before_reset": 0}), ("GRU", {"linear_before_reset": 1}), ("RNN", {})]]


@pytest.mark.parametrize("variant", ["plain", "states", "lens", "lens+states"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("op,attrs", CASES, ids=["LSTM", "GRU-lbr0", "GRU-lbr1", "RNN"])
def test_recurrent_matches_finite_differences(op, attrs, direction, variant):
    lens = [3, 1] if "lens" in variant else None
    nodes, inputs, consts, wrt = recurrent_case(op, direction, "states" in variant, lens, attrs=attrs)
    grads = assert_gradients_match(nodes, inputs, consts, wrt=tuple(wrt), opset=14)
    if lens:  # padding steps of the second sequence: no gradient at all
        assert np.all(grads[0][1:, 1] == 0)
        assert np.any(grads[0][:1, 1] != 0) and np.any(grads[0][:, 0] != 0)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("source", ["Y", "Y_h", "Y_c"])
def test_each_output_alone_is_a_gradient_source(op, source):
    if source not in SOURCES[op]:
        pytest.skip(f"{op} has no {source}")
    nodes, inputs, consts, wrt = recurrent_case(op, "bidirectional", True, [2, 3], sources=[source],
                                                attrs={"linear_before_reset": 1} if op == "GRU" else None)
    assert_gradients_match(nodes, inputs, consts, wrt=tuple(wrt), opset=14)


def _time_major_equivalent(node):
    """A layout=1 node as Transposes around its layout=0 twin (ONNX Runtime runs layout 0 only)."""
    x, *rest = node.input
    states = {i: rest[i - 1] for i in (5, 6) if len(node.input) > i and node.input[i]}
    inputs = [x + "_tm"] + [rest[i - 1] + "_tm" if i in states else rest[i - 1] for i in range(1, len(node.input))]
    outs = [o + "_tm" for o in node.output]
    twin = h.make_node(node.op_type, inputs, outs)
    twin.attribute.extend(a for a in node.attribute if a.name != "layout")
    perms = [[2, 0, 1, 3], [1, 0, 2], [1, 0, 2]]
    return ([h.make_node("Transpose", [x], [x + "_tm"], perm=[1, 0, 2])]
            + [h.make_node("Transpose", [s], [s + "_tm"], perm=[1, 0, 2]) for s in states.values()]
            + [twin] + [h.make_node("Transpose", [o + "_tm"], [o], perm=p) for o, p in zip(node.output, perms)])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_batch_major_layout_and_no_bias(op):
    """layout=1: the rule's gradient (built for the batch-major node) against finite differences of the
    same function written time-major; the forward node of the built model is swapped for that twin."""
    nodes, inputs, consts, wrt = recurrent_case(op, "bidirectional", True, [1, 3], layout=1, bias=False)
    batch_major, tail = nodes[0], nodes[1:]
    twin = _time_major_equivalent(batch_major)
    reference = graph_model(twin + tail, inputs, consts, opset=14)
    model = graph_model([batch_major] + tail, inputs, consts, opset=14, score_of=None)
    model.graph.initializer.extend(i for i in reference.graph.initializer if i.name == "onnxcam_test_R")
    model.graph.node.extend(n for n in reference.graph.node if n.output[0] in ("y64", "weighted", "score"))
    built = portable.build(model, "score", wrt)
    position = list(built.graph.node).index(batch_major)
    kept = list(built.graph.node)
    del built.graph.node[:]
    built.graph.node.extend(kept[:position] + twin + kept[position + 1:])
    ours = session(built).run([gradient_name(t) for t in wrt], inputs)
    for name, g in zip(wrt, ours):
        fd = finite_differences(reference, inputs, name, 1e-3)
        np.testing.assert_allclose(g, fd, rtol=1e-2, atol=3e-3 * max(1.0, np.abs(fd).max()), err_msg=name)
    assert np.all(ours[0][0, 1:] == 0)  # batch 0 has length 1


@pytest.mark.parametrize("opset", [11, 18])   # Split changes at 13 and 18
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_opsets_and_explicit_default_activations(op, opset):
    attrs = {"activations": ["Sigmoid", "Tanh", "Tanh"][:GATES[op] - 1 if op == "GRU" else 3] * 2}
    nodes, inputs, consts, wrt = recurrent_case(op, "bidirectional", True, [2, 3], attrs=attrs)
    assert_gradients_match(nodes, inputs, consts, wrt=tuple(wrt), opset=opset)


@pytest.mark.parametrize("op,attrs,why", [
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations"),
    ("GRU", {"activations": ["HardSigmoid", "Tanh"]}, "activations"),
    ("RNN", {"activations": ["Relu"]}, "activations"),
    ("LSTM", {"clip": 5.0}, "clip"),
    ("LSTM", {"input_forget": 1}, "input_forget"),
])
def test_other_variants_are_refused_with_the_reason(op, attrs, why):
    nodes, inputs, consts, _ = recurrent_case(op, attrs=attrs)
    model = graph_model(nodes, inputs, consts, opset=14)
    problems = portable.unsupported_ops(model, "score", ["x"])
    assert len(problems) == 1 and problems[0].startswith(op) and why in problems[0], problems
    with pytest.raises(OnnxcamError, match=why):
        portable.build(model, "score", ["x"])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_symbolic_sequence_length_and_batch(op):
    """The Scans run over whatever length the input has: one model, two lengths."""
    nodes, inputs, consts, wrt = recurrent_case(op, "bidirectional", True, attrs={"linear_before_reset": 1}
                                                if op == "GRU" else None)
    model = graph_model(nodes, inputs, consts, opset=14)
    x_dims = model.graph.input[0].type.tensor_type.shape.dim
    x_dims[0].dim_param, x_dims[1].dim_param = "time", "batch"
    del model.graph.value_info[:]
    for output in model.graph.output[:-1]:
        for k, dim in enumerate(output.type.tensor_type.shape.dim):
            dim.dim_param = f"{output.name}_{k}"
    for length in (T, T + 2):
        x = rand(length, N, I, seed=7, dtype=F32)
        feeds = {**inputs, "x": x}
        model.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(  # R of the score, resized
            rand(*session(graph_model(nodes, feeds, consts, opset=14, score_of=None)).run(["y"], feeds)[0].shape,
                 seed=8), "onnxcam_test_R"))
        for name, g in zip(wrt, gradients(model, feeds, wrt)):
            fd = finite_differences(model, feeds, name, 1e-3)
            np.testing.assert_allclose(g, fd, rtol=1e-2, atol=3e-3 * max(1.0, np.abs(fd).max()), err_msg=name)


def test_gradient_reaches_a_tensor_before_the_layer():
    """x -> Mul(2) -> LSTM: the rule's gradient flows on to earlier rules (and W is not on the path)."""
    nodes, inputs, consts, _ = recurrent_case("LSTM", "bidirectional", lens=[2, 3])
    nodes[0].input[0] = "x2"
    consts["two"] = np.array(2.0, np.float32)
    nodes = [h.make_node("Mul", ["x", "two"], ["x2"])] + nodes
    model = graph_model(nodes, inputs, consts, opset=14)
    g, g2 = gradients(model, inputs, ["x", "x2"])
    np.testing.assert_allclose(g, 2 * g2, rtol=1e-6)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_only_the_initial_state_on_the_path(op):
    """X a constant, initial_h (and initial_c) the explained tensors: an encoder state fed to a decoder."""
    nodes, inputs, consts, wrt = recurrent_case(op, "bidirectional", True, [3, 2])
    consts["x"] = inputs.pop("x")
    assert_gradients_match(nodes, inputs, consts, wrt=tuple(wrt[1:]), opset=14)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_node_without_a_Y_output(op):
    """Only the final states are outputs: the rule runs a copy of the node for the per-step states."""
    finals = SOURCES[op][1:]
    nodes, inputs, consts, wrt = recurrent_case(op, "bidirectional", True, [3, 2], sources=finals)
    del nodes[0].output[:]
    nodes[0].output.extend([""] + finals)
    assert_gradients_match(nodes, inputs, consts, wrt=tuple(wrt), opset=14)
