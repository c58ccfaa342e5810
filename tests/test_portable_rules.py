"""Shared test helper: build tiny graphs, run the portable backward pass, compare with finite differences."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcam.gradients import gradient_name, portable

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def graph_model(nodes, inputs: dict, consts: dict | None = None, outputs=("y",), opset: int = 17,
                score_of: str | None = "y", seed: int = 0) -> onnx.ModelProto:
    """A model whose graph inputs are ``inputs`` (name -> array), with constants ``consts``.

    With ``score_of``, appends score = ReduceSum(Cast(y, double) * R) for a fixed random R, so every
    element of y matters, and exposes ``score`` as an output.
    """
    consts = consts or {}
    graph_inputs = [helper.make_tensor_value_info(k, NP_TO_ONNX[v.dtype], v.shape) for k, v in inputs.items()]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    model = helper.make_model(helper.make_graph(list(nodes), "g", graph_inputs, [], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend([inferred[o] for o in outputs])
    if score_of is None:
        return model
    y_shape = session(model).run([score_of], inputs)[0].shape
    r = np.random.default_rng(seed + 1).normal(size=y_shape)
    model.graph.initializer.append(numpy_helper.from_array(r, "onnxcam_test_R"))
    model.graph.node.extend([
        helper.make_node("Cast", [score_of], ["y64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["y64", "onnxcam_test_R"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted"], ["score"], keepdims=0),
    ])
    model.graph.output.append(helper.make_tensor_value_info("score", TensorProto.DOUBLE, []))
    return model


def gradients(model: onnx.ModelProto, inputs: dict, wrt, score="score") -> list[np.ndarray]:
    built = portable.build(model, score, list(wrt))
    onnx.checker.check_model(built, full_check=True)
    names = [gradient_name(t) for t in wrt]
    return session(built).run(names, inputs)


def finite_differences(model: onnx.ModelProto, inputs: dict, name: str, eps: float,
                       score="score") -> np.ndarray:
    sess = session(model)
    x = inputs[name]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in np.ndindex(x.shape):
        values = []
        for sign in (1, -1):
            moved = x.copy()
            moved[i] += sign * eps
            values.append(float(sess.run([score], {**inputs, name: moved})[0]))
        out[i] = (values[0] - values[1]) / (2 * eps)
    return out


def assert_gradients_match(nodes, inputs: dict, consts: dict | None = None, wrt=("x",), opset: int = 17,
                           seed: int = 0):
    """Analytic gradients equal central differences: float64 tight, float32 with eps 1e-3 and 1 % tolerance."""
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    model = graph_model(nodes, inputs, consts, opset=opset, seed=seed)
    grads = gradients(model, inputs, wrt)
    for name, g in zip(wrt, grads):
        x = inputs[name]
        assert g.shape == x.shape and g.dtype == x.dtype
        double = x.dtype == np.float64
        fd = finite_differences(model, inputs, name, 1e-6 if double else 1e-3)
        scale = max(1.0, float(np.abs(fd).max()))
        np.testing.assert_allclose(g, fd, rtol=1e-6 if double else 1e-2, atol=(1e-7 if double else 3e-3) * scale,
                                   err_msg=f"d score / d {name}")
    return grads


# ---- the rules ------------------------------------------------------------------------------------
# ONNX Runtime's CPU provider has no float64 kernel for Conv, ConvTranspose, AveragePool, the global
# pools, Erf, Gelu, HardSigmoid, HardSwish, LeakyRelu, PRelu, Elu, InstanceNormalization, Resize and
# Softplus: those cases run in float32 (eps 1e-3, 1 % tolerance); everything else in float64.
import pytest  # noqa: E402
from onnx import helper as h  # noqa: E402

from onnxcam.errors import OnnxcamError  # noqa: E402

F32, F64 = np.float32, np.float64


def rand(*shape, dtype=F64, seed=0, low=None):
    x = np.random.default_rng(seed).normal(size=shape)
    if low is not None:
        x = np.abs(x) + low
    return np.asarray(x, dtype=dtype)


def away_from(x, points, gap=0.05):
    """Move values off the kinks (finite differences straddling a kink are meaningless)."""
    x = x.copy()
    for p in points:
        close = np.abs(x - p) < gap
        x[close] = p + np.where(x[close] >= p, gap, -gap)
    return x


def one(op, *inputs, **attrs):
    return [h.make_node(op, list(inputs), ["y"], **attrs)]


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


def test_binary_dynamic_shapes():
    """Operand shapes only known at run time: the Shape-based reduction (opset 13+)."""
    x, b = rand(2, 3, 4), rand(3, 1, seed=3)
    model = graph_model(one("Mul", "x", "b"), {"x": x, "b": b})
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
    assert_gradients_match(one("InstanceNormalization", "x", "s", "b", epsilon=1e-3), {"x": rand(2, 3, 4, 3, dtype=F32)},
                           {"s": rand(3, dtype=F32, seed=1), "b": rand(3, dtype=F32, seed=2)})
