"""Quantized (QDQ) and float16 models.

Oracles: torch's fake-quantize backward (the straight-through estimator of quantization-aware
training) for the QuantizeLinear / DequantizeLinear rules, finite differences with a step much larger
than the quantization step (the estimator is the slope of the staircase at that scale), the float
EfficientNet-Lite0 for a QDQ build made by onnxruntime's own quantizer, and the float32 model for its
float16 conversion.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h

from onnxcam.errors import OnnxcamError
from onnxcam.gradients import portable
from gradient_checks import finite_differences, gradients, graph_model

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")


def qdq(x="x", scale="s", zp="zp", axis=None, out="y"):
    attrs = {} if axis is None else {"axis": axis}
    return [h.make_node("QuantizeLinear", [x, scale, zp], ["q"], **attrs),
            h.make_node("DequantizeLinear", ["q", scale, zp], [out], **attrs)]


def test_qdq_per_tensor_equals_torch_fake_quantize():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32) * 2
    scale, zp = np.float32(0.02), np.uint8(100)        # range [-2.0, 3.1]: some values saturate
    model = graph_model(qdq(), {"x": x}, {"s": np.array(scale), "zp": np.array(zp)})
    (g,) = gradients(model, {"x": x}, ["x"])
    r = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "onnxcam_test_R"))
    xt = torch.tensor(x, requires_grad=True)
    y = torch.fake_quantize_per_tensor_affine(xt, float(scale), int(zp), 0, 255)
    (y.double() * torch.tensor(r)).sum().backward()
    saturated = (g == 0).mean()
    assert 0.05 < saturated < 0.95  # both sides of the range are exercised
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_qdq_per_channel_equals_torch_fake_quantize():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)
    scale = np.array([0.005, 0.01, 0.02], np.float32)   # int8: +-0.64, +-1.28, +-2.56
    zp = np.array([0, 10, -20], np.int8)
    model = graph_model(qdq(axis=1), {"x": x}, {"s": scale, "zp": zp})
    (g,) = gradients(model, {"x": x}, ["x"])
    r = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "onnxcam_test_R"))
    xt = torch.tensor(x, requires_grad=True)
    y = torch.fake_quantize_per_channel_affine(xt, torch.tensor(scale), torch.tensor(zp.astype(np.int32)),
                                               1, -128, 127)
    (y.double() * torch.tensor(r)).sum().backward()
    assert 0.05 < (g == 0).mean() < 0.95
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-6, atol=1e-7)


def _fd_check(nodes, x, consts, eps, tol, opset=17):
    model = graph_model(nodes, {"x": x}, consts, opset=opset)
    (g,) = gradients(model, {"x": x}, ["x"])
    fd = finite_differences(model, {"x": x}, "x", eps)
    np.testing.assert_allclose(g, fd, atol=tol)
    return g


def test_qdq_finite_differences_inside_and_outside_the_range():
    # scale 1e-3, step 0.05: the staircase's slope at that scale is the estimator, to ~s/eps
    rng = np.random.default_rng(2)
    inside = rng.uniform(-0.08, 0.1, size=12)        # representable: [-0.128, 0.127]
    outside = rng.uniform(0.3, 1.0, size=12) * rng.choice([-1, 1], size=12)
    x = np.concatenate([inside, outside]).astype(np.float32).reshape(2, 12)
    g = _fd_check(qdq(), x, {"s": np.array(1e-3, np.float32), "zp": np.array(0, np.int8)}, 0.02, 0.15)
    assert np.all(g.ravel()[12:] == 0) and np.all(g.ravel()[:12] != 0)


ORT_VERSION = tuple(int(v) for v in __import__("onnxruntime").__version__.split(".")[:2])


@pytest.mark.skipif(ORT_VERSION < (1, 18), reason="16-bit QuantizeLinear needs opset 21 (onnxruntime 1.18+)")
def test_quantized_conv_chain_finite_differences():
    """x -> QDQ -> Conv (int8 weights through DequantizeLinear) -> QDQ -> y, as the quantizer writes
    it; 16-bit activations (opset 21) so a finite-difference step well above the quantization step
    stays clear of the staircase's rounding."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.1, 0.1, size=(1, 2, 5, 5)).astype(np.float32)
    w = rng.integers(-100, 100, size=(3, 2, 3, 3)).astype(np.int8)
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             h.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
             h.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             *qdq("c", "s2", "zp2")]
    consts = {"s": np.array(1e-5, np.float32), "zp": np.array(0, np.int16), "w": w,
              "ws": np.array([0.01, 0.02, 0.005], np.float32), "s2": np.array(1e-4, np.float32),
              "zp2": np.array(0, np.int16)}
    g = _fd_check(nodes, x, consts, 5e-3, 0.05, opset=21)
    assert np.abs(g).max() > 1


def test_contrib_16bit_qdq_finite_differences():
    """onnxruntime's com.microsoft QuantizeLinear/DequantizeLinear (what the quantizer writes for
    16-bit activations below opset 21): the same rules, shapes inferred as for the standard ops."""
    rng = np.random.default_rng(6)
    x = rng.uniform(-0.2, 0.3, size=(2, 3, 4)).astype(np.float32)
    x.flat[:4] = [0.5, 0.6, -0.4, -0.5]                  # outside [-0.32767, 0.32768]: saturated
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], domain="com.microsoft"),
             h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], domain="com.microsoft")]
    consts = {"s": np.array(1e-5, np.float32), "zp": np.array(32767, np.uint16)}
    from onnx import numpy_helper
    from gradient_checks import session
    r = np.random.default_rng(7).normal(size=x.shape)
    nodes += [h.make_node("Cast", ["y"], ["y64"], to=TensorProto.DOUBLE),
              h.make_node("Mul", ["y64", "R"], ["w"]),
              h.make_node("ReduceSum", ["w"], ["score"], keepdims=0)]
    inits = [numpy_helper.from_array(v, k) for k, v in {**consts, "R": r}.items()]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                         [h.make_tensor_value_info("score", TensorProto.DOUBLE, [])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    built = portable.build(model, "score", ["x"])
    (g,) = session(built).run([gradient_name_of("x")], {"x": x})
    fd = finite_differences(model, {"x": x}, "x", 5e-3)
    np.testing.assert_allclose(g, fd, atol=0.05)
    assert np.all(g.flat[:4] == 0) and np.all(g.flat[4:] != 0)


def gradient_name_of(t):
    from onnxcam.gradients import gradient_name
    return gradient_name(t)


def test_dynamic_quantize_linear_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qzp"]),
             h.make_node("DequantizeLinear", ["q", "qs", "qzp"], ["y"])]
    _fd_check(nodes, x, {}, 0.2, 0.1)


def test_integer_tensor_without_a_rule_is_an_error_not_a_zero():
    """The int8 output of QuantizeLinear feeding an op with no rule for integers (MatMulInteger, or
    Abs on int8) is 'no rule', never a silent zero gradient."""
    x = np.random.default_rng(5).normal(size=(2, 3)).astype(np.float32)
    consts = {"s": np.array(0.01, np.float32), "zp": np.array(0, np.int8),
              "b": np.ones((3, 2), np.int8)}
    cases = {
        "MatMulInteger": [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                          h.make_node("MatMulInteger", ["q", "b"], ["m"]),
                          h.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT)],
        "Abs": [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                h.make_node("Abs", ["q"], ["a"]),
                h.make_node("DequantizeLinear", ["a", "s", "zp"], ["y"])],
        "Cast": [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),   # a float -> int truncation
                 h.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
                 h.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)],
    }
    for op, nodes in cases.items():
        model = graph_model(nodes, {"x": x}, consts)
        problems = portable.unsupported_ops(model, "score", ["x"])
        assert problems and op in problems[0], (op, problems)
        with pytest.raises(OnnxcamError, match="no exact gradient"):
            portable.build(model, "score", ["x"])


# ---- a QDQ EfficientNet-Lite0 from onnxruntime's quantizer ------------------------------------------

@pytest.fixture(scope="module")
def qdq_efficientnet(efficientnet_tools, tmp_path_factory):
    pytest.importorskip("onnxruntime.quantization")
    from make_audit_models import quantize_int8

    from conftest import MODEL_CACHE
    fp32 = efficientnet_tools.build(MODEL_CACHE / "efficientnet_lite0.onnx")
    folder = tmp_path_factory.mktemp("qdq")
    int8 = quantize_int8(fp32, folder / "efficientnet_lite0_qdq.onnx")
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int16 = quantize_int8(fp32, folder / "efficientnet_lite0_qdq16.onnx", activation_bits=16)
    assert {n.domain for n in onnx.load(str(int16)).graph.node if n.op_type == "QuantizeLinear"} == {"com.microsoft"}
    return fp32, {"int8": int8, "int16": int16}


CORRELATIONS = {}


@pytest.mark.parametrize("bits,node", [("int8", "_swish_1"), ("int8", "_blocks.15"), ("int16", "_swish_1")])
def test_qdq_efficientnet_maps_match_the_float_model(qdq_efficientnet, photos, bits, node):
    """Every gradient method on the QDQ builds correlates with the float model (int8 was all-zero).
    Measured (chelsea, coffee, rocket, astronaut): int8 >= 0.997 at `_swish_1` (the last conv layer)
    for every method; at `_blocks.15` (a linear projection, signed activations) >= 0.985 except
    XGrad-CAM, whose weights divide by the channel sums of signed activations (-0.25 to 0.99), left
    out there; 16-bit activations (com.microsoft Q/DQ) >= 0.996 at `_swish_1`."""
    from onnxcam import Explainer
    fp32, builds = qdq_efficientnet
    quantized = builds[bits]
    reference = Explainer(fp32, node=node, cache=False)
    explainer = Explainer(quantized, node=node, cache=False)
    assert explainer.gradient_backend_used is None
    for method in GRADIENT_METHODS:
        if node == "_blocks.15" and method == "xgradcam":
            continue
        a, b = reference.explain(photos, method=method), explainer.explain(photos, method=method)
        np.testing.assert_array_equal(a.targets, b.targets)
        corr = [float(np.corrcoef(a.maps[i].ravel(), b.maps[i].ravel())[0, 1]) for i in range(len(photos))]
        CORRELATIONS[(bits, node, method)] = corr
        print(f"QDQ {bits} vs float32 {node} {method}: " + " ".join(f"{c:.3f}" for c in corr))
        assert min(corr) >= 0.9, (method, corr)
    assert explainer.gradient_backend_used == "portable"


# ---- float16 models ------------------------------------------------------------------------------

def test_float16_model_every_method(tmp_path):
    from half_models import to_float16

    from onnxcam import Explainer
    from conftest import ROOT
    source = ROOT / "models" / "shapes_cnn.onnx"
    half = tmp_path / "shapes_cnn_fp16.onnx"
    onnx.save(to_float16(onnx.load(str(source))), str(half))
    assert onnx.load(str(half)).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = np.random.default_rng(0).random((2, 3, 64, 64)).astype(np.float32)
    reference, explainer = Explainer(source, cache=False), Explainer(half, cache=False)
    for method in ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "cam", "scorecam"):
        a, b = reference.explain(x, method=method), explainer.explain(x, method=method)
        assert b.maps.dtype == np.float32 and b.logits.dtype == np.float32
        np.testing.assert_array_equal(a.targets, b.targets)
        # measured max difference 0.0021 (float16 rounding of weights and activations)
        np.testing.assert_allclose(b.maps, a.maps, atol=0.02, err_msg=method)
