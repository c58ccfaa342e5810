"""Shared checks for gradient graphs: build one-op test models, run them on plain ONNX Runtime, and
compare the portable backend's gradients with central finite differences."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx import helper as h

from onnxcam.gradients import gradient_name, portable

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


OLD_ORT = tuple(int(v) for v in ort.__version__.split(".")[:2]) < (1, 20)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    # the rules are checked as written: no fusions (older builds fuse MatMul+Transpose into a
    # contrib op that has no float64 kernel)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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
