"""Every portable gradient rule against central finite differences (helpers in gradient_checks.py):
tiny graphs, score = ReduceSum(y * R) for a fixed random R."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as h

from onnxcam.errors import OnnxcamError
from onnxcam.gradients import gradient_name, portable

from gradient_checks import (F32, F64, OLD_ORT, assert_gradients_match, away_from,
                             finite_differences, gradients, graph_model, one, rand, session)


UNARY = [  # op, attrs, dtype, kinks, positive-only input
    ("Relu", {}, F64, [0], False), ("Neg", {}, F64, [], False), ("Sigmoid", {}, F64, [], False),
    ("Tanh", {}, F64, [], False), ("Exp", {}, F64, [], False), ("Log", {}, F64, [], True),
    ("Sqrt", {}, F64, [], True), ("Reciprocal", {}, F64, [], True), ("Abs", {}, F64, [0], False),
    ("Identity", {}, F64, [], False), ("LeakyRelu", {"alpha": 0.2}, F32, [0], False),
    ("HardSigmoid", {}, F32, [-2.5, 2.5], False), ("HardSigmoid", {"alpha": 0.5, "beta": 0.1}, F32, [-0.2, 1.8], False),
    ("HardSwish", {}, F32, [-3, 3], False), ("Erf", {}, F32, [], False), ("Elu", {"alpha": 0.7}, F32, [0], False),
    ("Softplus", {}, F32, [], False),
]


@pytest.mark.parametrize("op,attrs,dtype,kinks,positive", UNARY, ids=[f"{u[0]}{i}" for i, u in enumerate(UNARY)])
def test_unary(op, attrs, dtype, kinks, positive):
    x = rand(2, 3, 4, dtype=F64, low=0.2 if positive else None) * (1 if positive else 2.5)
    assert_gradients_match(one(op, "x", **attrs), {"x": away_from(x, kinks).astype(dtype)})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    assert_gradients_match(one("Gelu", "x", approximate=approximate), {"x": rand(2, 5, dtype=F32) * 2}, opset=20)


BROADCASTS = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (3, 1)), ((2, 3, 4), (4,)), ((2, 3, 4), ()), ((3, 1), (2, 1, 4)),
              ((1, 3, 1), (2, 1, 4))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow"])
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
def test_binary_broadcast(op, shapes):
    a = rand(*shapes[0], seed=1, low=0.5 if op == "Pow" else None)
    b = rand(*shapes[1], seed=2) + (3 if op == "Div" else 0)
    wrt = ("x",) if op == "Pow" else ("x", "b")
    assert_gradients_match(one(op, "x", "b"), {"x": a, "b": b} if op != "Pow" else {"x": a},
                           consts={"b": b} if op == "Pow" else None, wrt=wrt)


def test_same_tensor_twice_and_mean():
    x = rand(3, 4)
    assert_gradients_match(one("Mul", "x", "x"), {"x": x})
    assert_gradients_match(one("Mean", "x", "b", "x"), {"x": x.astype(F32), "b": rand(4, dtype=F32)}, wrt=("x", "b"))


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
@pytest.mark.parametrize("b_shape", [(3, 1), (1, 4), (2, 3, 4), (1, 1, 1)])
def test_binary_dynamic_shapes(opset, b_shape):
    """Operand shapes only known at run time: the Shape-based reduction (opset 13+), or the
    axis-by-axis form with static axes (opset 11 and 12)."""
    x, b = rand(2, 3, 4), rand(*b_shape, seed=3)
    model = graph_model(one("Mul", "x", "b"), {"x": x, "b": b}, opset=opset)
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            d.dim_param = "d" + vi.name + str(id(d) % 97)
    grads = gradients(model, {"x": x, "b": b}, ["x", "b"])
    for name, g in zip(["x", "b"], grads):
        np.testing.assert_allclose(g, finite_differences(model, {"x": x, "b": b}, name, 1e-6), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("slope_shape", [(1,), (3, 1, 1)])
def test_prelu(slope_shape):
    x = away_from(rand(2, 3, 2, 2, dtype=F64) * 2, [0]).astype(F32)
    assert_gradients_match(one("PRelu", "x", "s"), {"x": x, "s": rand(*slope_shape, dtype=F32, seed=4)},
                           wrt=("x", "s"))


@pytest.mark.parametrize("bounds,opset", [((0.0, 6.0), 17), ((-1.0, None), 17), ((None, 0.5), 17), ((0.0, 6.0), 11),
                                          ((-0.5, 0.7), 6)])
def test_clip(bounds, opset):
    low, high = bounds
    x = away_from(rand(3, 4) * 4, [b for b in bounds if b is not None])
    if opset < 12:  # no float64 Clip kernel before opset 12
        x = x.astype(F32)
    if opset < 11:  # attributes; the model itself is then below the backend's opset floor
        model = graph_model(one("Clip", "x", min=low, max=high), {"x": x}, opset=opset)
        with pytest.raises(OnnxcamError, match="opset"):
            portable.build(model, "score", ["x"])
        return
    inputs = ["x", "lo" if low is not None else "", "hi" if high is not None else ""]
    consts = {k: np.array(v, x.dtype) for k, v in (("lo", low), ("hi", high)) if v is not None}
    assert_gradients_match([h.make_node("Clip", inputs, ["y"])], {"x": x}, consts, opset=opset)


def test_clip_boundaries_follow_torch_relu6():
    """At x == min or x == max exactly the gradient is 0 (torch.nn.functional.relu6 / hardtanh)."""
    x = np.array([[-1.0, 0.0, 3.0, 6.0, 7.0]])
    model = graph_model(one("Clip", "x", "lo", "hi"), {"x": x}, {"lo": np.array(0.0), "hi": np.array(6.0)})
    r = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "onnxcam_test_R")
    (g,) = gradients(model, {"x": x}, ["x"])
    np.testing.assert_allclose(g, r * np.array([[0, 0, 1, 0, 0]]))


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis,opset", [(None, 11), (1, 11), (-1, 13), (1, 13), (0, 17)])
def test_softmax(op, axis, opset):
    attrs = {} if axis is None else {"axis": axis}
    assert_gradients_match(one(op, "x", **attrs), {"x": rand(2, 3, 4)}, opset=opset)


@pytest.mark.parametrize("ta,tb,alpha,beta,c_shape", [(0, 0, 1.0, 1.0, (4,)), (1, 0, 0.5, 2.0, (3, 4)),
                                                      (0, 1, 1.5, 1.0, (1, 4)), (1, 1, 1.0, 0.3, ()),
                                                      (0, 0, 1.0, 1.0, None)])
def test_gemm(ta, tb, alpha, beta, c_shape):
    a = rand(*((2, 3) if ta else (3, 2)), seed=1)
    b = rand(*((4, 2) if tb else (2, 4)), seed=2)
    inputs = {"x": a, "b": b}
    names = ["x", "b"]
    if c_shape is not None:
        inputs["c"] = rand(*c_shape, seed=3)
        names.append("c")
    assert_gradients_match(one("Gemm", *names, transA=ta, transB=tb, alpha=alpha, beta=beta), inputs, wrt=names)


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 2)), ((2, 3, 4), (4, 5)), ((4,), (4, 3)), ((2, 3, 4), (4,)),
                                   ((4,), (4,)), ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (2, 4, 5))], ids=str)
def test_matmul(sa, sb):
    assert_gradients_match(one("MatMul", "x", "b"), {"x": rand(*sa, seed=1), "b": rand(*sb, seed=2)}, wrt=("x", "b"))


CONVS = [  # input shape, weight shape, attrs
    ((1, 2, 5, 5), (3, 2, 3, 3), {}),
    ((2, 2, 6, 7), (3, 2, 3, 2), {"strides": [2, 2], "pads": [1, 0, 1, 1]}),
    ((1, 2, 7, 6), (4, 2, 3, 3), {"strides": [3, 2], "dilations": [2, 1], "pads": [2, 1, 0, 1]}),
    ((1, 4, 6, 6), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((1, 4, 5, 5), (6, 2, 2, 2), {"group": 2}),
    ((1, 4, 7, 6), (8, 2, 3, 3), {"group": 2, "pads": [2, 0, 1, 2], "dilations": [1, 2]}),
    ((1, 3, 7, 6), (3, 1, 3, 3), {"group": 3, "pads": [2, 2, 2, 2], "dilations": [2, 2]}),
    ((1, 2, 5, 6), (3, 2, 2, 3), {"pads": [2, 0, 0, 3]}),  # pads beyond the kernel reach: ConvTranspose
    ((1, 2, 7, 6), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 2, 6, 7), (3, 2, 2, 2), {"auto_pad": "SAME_LOWER", "strides": [2, 1]}),
    ((1, 2, 7, 7), (3, 2, 3, 3), {"auto_pad": "VALID", "strides": [2, 3]}),
    ((1, 2, 9), (3, 2, 3), {"strides": [2], "pads": [1, 1]}),
    ((1, 2, 4, 5, 5), (2, 2, 2, 3, 3), {"strides": [1, 2, 2], "pads": [0, 1, 1, 1, 0, 1]}),
]


@pytest.mark.parametrize("xs,ws,attrs", CONVS, ids=[str(c[2]) for c in CONVS])
@pytest.mark.parametrize("bias", [False, True])
def test_conv(xs, ws, attrs, bias):
    consts = {"w": rand(*ws, dtype=F32, seed=5)}
    names = ["x", "w"]
    if bias:
        consts["bias"] = rand(ws[0], dtype=F32, seed=6)
        names.append("bias")
    assert_gradients_match(one("Conv", *names, **attrs), {"x": rand(*xs, dtype=F32)}, consts)


CONV_TRANSPOSES = [
    ((1, 2, 4, 4), (2, 3, 3, 3), {}),
    ((1, 2, 4, 3), (2, 3, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 1]}),
    ((1, 2, 3, 4), (2, 2, 3, 2), {"strides": [2, 3], "output_padding": [1, 2], "pads": [1, 1, 0, 0]}),
    ((1, 4, 3, 3), (4, 1, 3, 3), {"group": 4, "strides": [2, 2], "dilations": [2, 1]}),
    ((1, 2, 5), (2, 2, 4), {"strides": [2], "pads": [1, 2], "auto_pad": "NOTSET"}),
]


@pytest.mark.parametrize("xs,ws,attrs", CONV_TRANSPOSES, ids=[str(c[2]) for c in CONV_TRANSPOSES])
def test_conv_transpose(xs, ws, attrs):
    assert_gradients_match(one("ConvTranspose", "x", "w", **attrs), {"x": rand(*xs, dtype=F32)},
                           {"w": rand(*ws, dtype=F32, seed=5)})


MAXPOOLS = [
    ((1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ((2, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),  # overlapping
    ((1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 9, 9), {"kernel_shape": [3, 3], "strides": [1, 2], "dilations": [2, 2], "pads": [2, 1, 0, 1]}),
    ((1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 3, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
]


@pytest.mark.parametrize("xs,attrs", MAXPOOLS, ids=[str(m[1]) for m in MAXPOOLS])
@pytest.mark.parametrize("opset", [12, 17])
def test_max_pool(xs, attrs, opset):
    """Opset 17 scatters through Indices with reduction='add'; opset 12 uses masks + ConvTranspose."""
    assert_gradients_match(one("MaxPool", "x", **attrs), {"x": rand(*xs, dtype=F32) * 3}, opset=opset)


def test_max_pool_ties_go_to_the_first_maximum():
    """A window of equal values (zeros after a ReLU): torch sends the gradient to its first element."""
    x = np.zeros((1, 1, 4, 4), F32)
    x[0, 0, 3, 3] = 1.0
    for opset in (12, 17):
        model = graph_model(one("MaxPool", "x", kernel_shape=[2, 2], strides=[2, 2]), {"x": x}, opset=opset)
        r = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "onnxcam_test_R")
        (g,) = gradients(model, {"x": x}, ["x"])
        expected = np.zeros_like(x)
        expected[0, 0, ::2, ::2] = r[0, 0]
        expected[0, 0, 2, 2], expected[0, 0, 3, 3] = 0, r[0, 0, 1, 1]
        np.testing.assert_allclose(g, expected, rtol=1e-6)


AVGPOOLS = [
    ((1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ((1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 0}),
    ((1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 0, 1, 1],
                    "count_include_pad": 1}),
    ((1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 9), {"kernel_shape": [4], "strides": [3], "pads": [2, 1], "count_include_pad": 1}),
]


@pytest.mark.parametrize("xs,attrs", AVGPOOLS, ids=[str(m[1]) for m in AVGPOOLS])
def test_average_pool(xs, attrs):
    if attrs.get("ceil_mode") and attrs.get("count_include_pad") and OLD_ORT:
        pytest.skip("onnxruntime < 1.20 computes this AveragePool forward unlike the ONNX spec "
                    "(0.21 away from onnx.reference), so finite differences of it are not an oracle")
    assert_gradients_match(one("AveragePool", "x", **attrs), {"x": rand(*xs, dtype=F32)})


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("xs", [(2, 3, 4, 5), (1, 2, 6), (1, 2, 2, 3, 2)], ids=str)
def test_global_pool(op, xs):
    assert_gradients_match(one(op, "x"), {"x": rand(*xs, dtype=F32)})


REDUCES = [([1], 1), ([1], 0), ([0, 2], 0), ([-1], 1), (None, 0), (None, 1)]


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare",
                                "ReduceLogSumExp"])
@pytest.mark.parametrize("axes,keepdims", REDUCES, ids=str)
@pytest.mark.parametrize("opset", [12, 18])
def test_reduce(op, axes, keepdims, opset):
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    attrs = {"keepdims": keepdims}
    consts, inputs = {}, ["x"]
    if axes is not None and axes_as_input:
        consts["axes"], inputs = np.array(axes, np.int64), ["x", "axes"]
    elif axes is not None:
        attrs["axes"] = axes
    assert_gradients_match([h.make_node(op, inputs, ["y"], **attrs)], {"x": rand(2, 3, 4)}, consts, opset=opset)


def test_reduce_max_splits_ties_like_torch_amax():
    x = np.array([[1.0, 3.0, 3.0, 0.0]])
    model = graph_model(one("ReduceMax", "x", "axes", keepdims=0), {"x": x}, {"axes": np.array([1])}, opset=18)
    r = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "onnxcam_test_R")
    (g,) = gradients(model, {"x": x}, ["x"])
    np.testing.assert_allclose(g, [[0, r[0] / 2, r[0] / 2, 0]])


@pytest.mark.parametrize("opset", [11, 17])
def test_batch_norm(opset):
    c = 3
    consts = {"s": rand(c, seed=1), "b": rand(c, seed=2), "m": rand(c, seed=3), "v": rand(c, seed=4, low=0.5)}
    assert_gradients_match(one("BatchNormalization", "x", "s", "b", "m", "v", epsilon=1e-3),
                           {"x": rand(2, c, 3, 2)}, consts, opset=opset)


@pytest.mark.parametrize("axis,opset", [(-1, 17), (1, 17), (2, 18)])
def test_layer_norm(axis, opset):
    x = rand(2, 3, 4)
    shape = x.shape[axis % 3:]
    assert_gradients_match(one("LayerNormalization", "x", "s", "b", axis=axis, epsilon=1e-3), {"x": x},
                           {"s": rand(*shape, seed=1), "b": rand(*shape, seed=2)}, opset=opset)


def test_instance_norm():
    assert_gradients_match(one("InstanceNormalization", "x", "s", "b", epsilon=1e-3),
                           {"x": rand(2, 3, 4, 3, dtype=F32)},
                           {"s": rand(3, dtype=F32, seed=1), "b": rand(3, dtype=F32, seed=2)})


def _shape_case(name, nodes, x_shape, consts=None, opset=17, dtype=F64):
    return pytest.param(nodes, x_shape, consts or {}, opset, dtype, id=name)


def _ints(*v):
    return np.array(v, np.int64)


SHAPE_OPS = [
    _shape_case("Reshape", one("Reshape", "x", "s"), (2, 3, 4), {"s": _ints(4, -1)}),
    _shape_case("Flatten", one("Flatten", "x", axis=2), (2, 3, 4, 2)),
    _shape_case("Squeeze-input", one("Squeeze", "x", "a"), (2, 1, 4), {"a": _ints(1)}),
    _shape_case("Squeeze-attr", one("Squeeze", "x", axes=[1]), (2, 1, 4), opset=12),
    _shape_case("Unsqueeze-input", one("Unsqueeze", "x", "a"), (2, 4), {"a": _ints(0, 3)}),
    _shape_case("Unsqueeze-attr", one("Unsqueeze", "x", axes=[1]), (2, 4), opset=11),
    _shape_case("Transpose", one("Transpose", "x", perm=[2, 0, 1]), (2, 3, 4)),
    _shape_case("Transpose-default", one("Transpose", "x"), (2, 3, 4)),
    _shape_case("Identity", one("Identity", "x"), (2, 3)),
    _shape_case("Dropout", one("Dropout", "x"), (2, 3), dtype=F32),
    _shape_case("Cast-f32-f64", one("Cast", "x", to=TensorProto.DOUBLE), (2, 3), dtype=F32),
    _shape_case("Concat-self", one("Concat", "x", "c", "x", axis=1), (2, 3, 2), {"c": rand(2, 2, 2, seed=7)}),
    _shape_case("Slice", one("Slice", "x", "st", "en"), (4, 5), {"st": _ints(1, 0), "en": _ints(3, -1)}),
    _shape_case("Slice-steps", one("Slice", "x", "st", "en", "ax", "sp"), (3, 7, 8),
                {"st": _ints(1, -1), "en": _ints(100, 0), "ax": _ints(1, 2), "sp": _ints(2, -3)}),
    _shape_case("Slice-reverse", one("Slice", "x", "st", "en", "ax", "sp"), (3, 5),
                {"st": _ints(-1), "en": _ints(-1000), "ax": _ints(-1), "sp": _ints(-1)}),
    _shape_case("Slice-empty", one("Slice", "x", "st", "en"), (3, 5), {"st": _ints(2), "en": _ints(2)}),
    _shape_case("Gather-scalar", one("Gather", "x", "i", axis=1), (2, 4, 3), {"i": np.array(-2, np.int64)}),
    _shape_case("Gather-repeats", one("Gather", "x", "i", axis=1), (2, 4, 3), {"i": _ints(3, 0, 3)}),
    _shape_case("Gather-2d-last", one("Gather", "x", "i", axis=2), (2, 4, 3), {"i": np.array([[0, 2], [2, 2]])}),
    _shape_case("Pad", one("Pad", "x", "p"), (2, 3, 4), {"p": _ints(0, 1, 2, 1, 0, -1)}),
    _shape_case("Pad-value-axes", one("Pad", "x", "p", "v", "ax"), (2, 3, 4),
                {"p": _ints(1, 2, 0, 3), "v": np.array(1.5), "ax": _ints(2, 0)}, opset=18),
    _shape_case("Expand", one("Expand", "x", "s"), (3, 1), {"s": _ints(2, 3, 4)}),
    _shape_case("Where", one("Where", "c", "x", "x2"), (2, 3), {"c": np.array([True, False, True]),
                                                                  "x2": rand(2, 1, seed=3)}),
    _shape_case("Split-attr", [h.make_node("Split", ["x"], ["y", "u"], axis=1, split=[1, 3])], (2, 4), opset=11),
    _shape_case("Split-input", [h.make_node("Split", ["x", "sp"], ["u", "y"], axis=0)], (5, 2), {"sp": _ints(2, 3)}),
    _shape_case("Split-num-outputs", [h.make_node("Split", ["x"], ["y", "u", "v"], axis=1, num_outputs=3)],
                (2, 6), opset=18),
]


@pytest.mark.parametrize("nodes,x_shape,consts,opset,dtype", SHAPE_OPS)
def test_shape_ops(nodes, x_shape, consts, opset, dtype):
    consts = {k: (v.astype(dtype) if v.dtype == np.float64 else v) for k, v in consts.items()}
    assert_gradients_match(nodes, {"x": rand(*x_shape, dtype=dtype)}, consts, opset=opset)


def test_dynamic_concat_and_split_zero_fill():
    """Concat along an axis whose sizes are only known at run time; a Split output that is unused."""
    x = rand(2, 3)
    model = graph_model(one("Concat", "x", "x", axis=0), {"x": x})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    (g,) = gradients(model, {"x": x}, ["x"])
    np.testing.assert_allclose(g, finite_differences(model, {"x": x}, "x", 1e-6), rtol=1e-6, atol=1e-8)


RESIZES = [
    ("nearest", "asymmetric", "floor", (1, 1, 3, 4), [1, 1, 2, 2]),
    ("nearest", "half_pixel", "round_prefer_floor", (1, 2, 3, 4), [1, 1, 2.5, 1.5]),
    ("nearest", "align_corners", "round_prefer_ceil", (1, 1, 4, 3), [1, 1, 0.5, 2]),
    ("linear", "half_pixel", None, (1, 2, 3, 4), [1, 1, 2, 2]),
    ("linear", "pytorch_half_pixel", None, (1, 1, 4, 5), [1, 1, 0.5, 1.7]),
    ("linear", "align_corners", None, (1, 1, 3, 4), [1, 1, 2, 3]),
    ("linear", "asymmetric", None, (2, 3, 5), [1, 1, 1.6]),
    ("linear", "half_pixel", None, (1, 1, 2, 3, 2), [1, 1, 2, 1, 1.5]),
    ("cubic", "half_pixel", None, (1, 2, 5, 6), [1, 1, 1.6, 0.5]),
    ("cubic", "align_corners", None, (1, 1, 4, 3), [1, 1, 2, 2]),
    ("cubic", "asymmetric", "exclude_outside", (1, 1, 6, 5), [1, 1, 0.5, 2]),
]


@pytest.mark.parametrize("mode,transform,nearest,xs,scales", RESIZES,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in RESIZES])
@pytest.mark.parametrize("by_sizes", [False, True])
def test_resize(mode, transform, nearest, xs, scales, by_sizes):
    attrs = {"mode": mode, "coordinate_transformation_mode": transform}
    if nearest == "exclude_outside":
        attrs["exclude_outside"] = 1
    elif nearest:
        attrs["nearest_mode"] = nearest
    if by_sizes:
        sizes = _ints(*[int(np.floor(n * s)) for n, s in zip(xs, scales)])
        nodes, consts = one("Resize", "x", "", "", "sizes", **attrs), {"sizes": sizes}
    else:
        nodes, consts = one("Resize", "x", "", "scales", **attrs), {"scales": np.array(scales, F32)}
    assert_gradients_match(nodes, {"x": rand(*xs, dtype=F32)}, consts, opset=13)


# ---- what is (not) differentiated ----------------------------------------------------------------

@pytest.mark.parametrize("op", ["Mod", "Det"])
def test_unsupported_op_on_the_path_is_an_error(op):
    x = rand(2, 3, 3, dtype=F32) + 5  # ORT has Det in float32 only
    nodes = [h.make_node("Relu", ["x"], ["r"], name="/a/relu"),
             h.make_node(op, ["r", "r"] if op == "Mod" else ["r"], ["m"], name="/a/b/" + op,
                         **({"fmod": 1} if op == "Mod" else {})),
             h.make_node("Mul", ["m", "m"], ["y"])]
    model = graph_model(nodes, {"x": x})
    assert portable.unsupported_ops(model, "score", ["x"]) == [f"{op} (node /a/b/{op}): no gradient rule for this op"]
    assert portable.unsupported_ops(model, "score", ["m"]) == []
    with pytest.raises(OnnxcamError, match=f"{op} \\(node /a/b/{op}\\)"):
        portable.build(model, "score", ["x"])


def test_unsupported_attribute_is_reported():
    nodes = one("Pad", "x", "p", mode="reflect")
    model = graph_model(nodes, {"x": rand(2, 4)}, {"p": _ints(0, 1, 0, 1)})
    assert portable.unsupported_ops(model, "score", ["x"]) == ["Pad (node y): mode='reflect' (only constant padding)"]


def test_ops_off_the_path_need_no_rule():
    """Det feeds the score but not from x; Mod depends on x but does not reach the score."""
    x = rand(3, 3, dtype=F32)
    nodes = [h.make_node("Det", ["c"], ["d"]), h.make_node("Mod", ["x", "c"], ["unused"], fmod=1),
             h.make_node("Mul", ["x", "d"], ["y"])]
    consts = {"c": rand(3, 3, seed=9, dtype=F32)}
    model = graph_model(nodes, {"x": x}, consts, outputs=("y", "unused"))
    assert portable.unsupported_ops(model, "score", ["x"]) == []
    assert_gradients_match(nodes, {"x": x}, consts)


def test_wrt_not_reaching_score_gets_zeros_and_original_outputs_stay():
    x = rand(2, 3)
    nodes = [h.make_node("Relu", ["x"], ["side"]), h.make_node("Sigmoid", ["b"], ["y"])]
    model = graph_model(nodes, {"x": x, "b": rand(2, 3, seed=1)}, outputs=("y", "side"))
    built = portable.build(model, "score", ["side", "y"])
    onnx.checker.check_model(built, full_check=True)
    assert [o.name for o in built.graph.output] == ["y", "side", "score", gradient_name("side"), gradient_name("y")]
    side_grad, y_grad = session(built).run([gradient_name("side"), gradient_name("y")], {"x": x, "b": x})
    np.testing.assert_array_equal(side_grad, np.zeros_like(x))
    assert y_grad.shape == x.shape and np.abs(y_grad).sum() > 0


def test_input_model_is_not_mutated():
    model = graph_model(one("MaxPool", "x", kernel_shape=[2, 2]), {"x": rand(1, 1, 4, 4, dtype=F32)})
    before = model.SerializeToString()
    portable.build(model, "score", ["x"])
    assert model.SerializeToString() == before


def test_explainer_target_head_treats_argmax_path_as_constant():
    """The score head surgery adds: W_eff = W + onehot(argmax z) * (1 - has_any(W)); score = sum(z * W_eff)."""
    n, k = 3, 5
    a = rand(n, 4, dtype=F32)
    weight = rand(4, k, dtype=F32, seed=2)
    nodes = [
        h.make_node("MatMul", ["act", "fc"], ["z"]),
        h.make_node("ArgMax", ["z"], ["arg"], axis=1, keepdims=0),
        h.make_node("OneHot", ["arg", "depth", "values"], ["onehot"], axis=-1),
        h.make_node("Cast", ["onehot"], ["w_auto"], to=TensorProto.FLOAT),
        h.make_node("Abs", ["onnxcam_target_weights"], ["w_abs"]),
        h.make_node("ReduceSum", ["w_abs", "one_axis"], ["w_sum"], keepdims=1),
        h.make_node("Greater", ["w_sum", "zero"], ["has_bool"]),
        h.make_node("Cast", ["has_bool"], ["has"], to=TensorProto.FLOAT),
        h.make_node("Sub", ["one", "has"], ["no_w"]),
        h.make_node("Mul", ["w_auto", "no_w"], ["w_fill"]),
        h.make_node("Add", ["onnxcam_target_weights", "w_fill"], ["w_eff"]),
        h.make_node("Mul", ["z", "w_eff"], ["zw"]),
        h.make_node("ReduceSum", ["zw"], ["score"], keepdims=0),
    ]
    consts = {"fc": weight, "depth": np.array(k, np.int64), "values": np.array([0, 1], np.int64),
              "one_axis": _ints(1), "zero": np.array(0, F32), "one": np.array(1, F32)}
    inputs = {"act": a, "onnxcam_target_weights": np.zeros((n, k), F32)}
    model = graph_model(nodes, inputs, consts, outputs=("z", "score"), score_of=None)
    assert portable.unsupported_ops(model, "score", ["act"]) == []
    built = portable.build(model, "score", ["act"])
    onnx.checker.check_model(built, full_check=True)
    sess = session(built)
    z, g = sess.run(["z", gradient_name("act")], inputs)
    np.testing.assert_allclose(g, weight.T[z.argmax(1)], rtol=1e-6)
    w = np.zeros((n, k), F32)
    w[:, 1] = 1
    (g1,) = sess.run([gradient_name("act")], {**inputs, "onnxcam_target_weights": w})
    np.testing.assert_allclose(g1, np.tile(weight.T[1], (n, 1)), rtol=1e-6)


@pytest.mark.parametrize("xs,ws,attrs", [CONVS[1], CONVS[2], CONVS[3], CONVS[-2]], ids=["s2", "s3-dil", "dw", "1d"])
def test_conv_with_run_time_spatial_sizes(xs, ws, attrs):
    """Spatial sizes unknown to shape inference: the ConvTranspose is cut/padded to x's size at run time."""
    x, w = rand(*xs, dtype=F32), rand(*ws, dtype=F32, seed=5)
    model = graph_model(one("Conv", "x", "w", **attrs), {"x": x}, {"w": w})
    for k, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if k >= 2:
            d.dim_param = f"s{k}"
    for k, d in enumerate(model.graph.output[0].type.tensor_type.shape.dim):
        d.dim_param = f"o{k}"
    assert "ConvTranspose" in {n.op_type for n in portable.build(model, "score", ["x"]).graph.node}
    (g,) = gradients(model, {"x": x}, ["x"])
    fd = finite_differences(model, {"x": x}, "x", 1e-3)
    np.testing.assert_allclose(g, fd, rtol=1e-2, atol=3e-3 * max(1.0, np.abs(fd).max()))
