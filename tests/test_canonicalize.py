"""canonicalize_for_gradients: every rewrite keeps the model's outputs (plain onnxruntime, <= 1e-5)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.gradients.canonical import PREFIX, canonicalize_for_gradients

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)
SHAPE = [2, 4, 6, 6]


def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def i64(name, value):
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def bn_params(c=4):
    return [f32("g", RNG.uniform(0.5, 1.5, c)), f32("b", RNG.normal(size=c)), f32("mu", RNG.normal(size=c)),
            f32("var", RNG.uniform(0.2, 1.5, c))]


def make(nodes, inits, opset=17, shape=SHAPE, outputs=("y",), symbolic=False):
    dims = ["N"] + shape[1:] if symbolic else shape
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


CASES = {
    "batchnorm_const": (make([helper.make_node("BatchNormalization", ["x", "g", "b", "mu", "var"], ["y"],
                                               epsilon=1e-3)], bn_params()), "BatchNormalization"),
    "batchnorm_2d_input": (make([helper.make_node("Flatten", ["x"], ["f"]),
                                 helper.make_node("BatchNormalization", ["f", "g", "b", "mu", "var"], ["y"])],
                                bn_params(144)), "BatchNormalization"),
    "batchnorm_graph_params": (make([helper.make_node("Exp", ["g0"], ["g"]),
                                     helper.make_node("BatchNormalization", ["x", "g", "b", "mu", "var"], ["y"])],
                                    [f32("g0", RNG.normal(size=4))] + bn_params()[1:]), "BatchNormalization"),
    "dropout": (make([helper.make_node("Dropout", ["x", "ratio"], ["d"]), helper.make_node("Relu", ["d"], ["y"])],
                     [f32("ratio", 0.3)]), "Dropout"),
    "dropout_mask_used": (make([helper.make_node("Dropout", ["x"], ["d", "m"]),
                                helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
                                helper.make_node("Mul", ["d", "mf"], ["y"])], []), "Dropout"),
    "layernorm": (make([helper.make_node("LayerNormalization", ["x", "lg", "lb"], ["y"], axis=-1)],
                       [f32("lg", RNG.uniform(0.5, 1.5, 6)), f32("lb", RNG.normal(size=6))]), None),
    "layernorm_shared_weights": (make([helper.make_node("LayerNormalization", ["x", "lg", "lb"], ["l1"], axis=-1),
                                       helper.make_node("LayerNormalization", ["l1", "lg", "lb"], ["y"], axis=-1)],
                                      [f32("lg", RNG.uniform(0.5, 1.5, 6)), f32("lb", RNG.normal(size=6))]), None),
    "split_sizes_partly_used": (make([helper.make_node("Split", ["x", "sp"], ["y", "unused"], axis=1)],
                                     [i64("sp", [1, 3])], opset=13), "Split"),
    "split_equal_opset18": (make([helper.make_node("Split", ["x"], ["a", "b"], axis=-1, num_outputs=2),
                                  helper.make_node("Sub", ["a", "b"], ["y"])], [], opset=18), "Split"),
    "split_dynamic_dim": (make([helper.make_node("Split", ["x"], ["a", "b", "c"], axis=0, num_outputs=3),
                                helper.make_node("Concat", ["c", "a", "b"], ["y"], axis=0)], [], opset=18,
                               shape=[5, 4, 6, 6], symbolic=True), "Split"),
    "split_attr_opset11": (make([helper.make_node("Split", ["x"], ["y", "z"], axis=2, split=[2, 4])], [], opset=11,
                                outputs=("y", "z")), "Split"),
    "hardsigmoid": (make([helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)], []), "HardSigmoid"),
    "hardswish": (make([helper.make_node("HardSwish", ["x"], ["y"])], []), "HardSwish"),
    "prelu": (make([helper.make_node("PRelu", ["x", "s"], ["y"])], [f32("s", RNG.uniform(0, 0.5, (4, 1, 1)))]),
              "PRelu"),
    "elu": (make([helper.make_node("Elu", ["x"], ["y"], alpha=0.7)], []), "Elu"),
    "selu": (make([helper.make_node("Selu", ["x"], ["y"])], []), "Selu"),
    "softplus": (make([helper.make_node("Softplus", ["x"], ["y"])], []), "Softplus"),
    "mish": (make([helper.make_node("Mish", ["x"], ["y"])], [], opset=18), "Mish"),
    "sum_mean": (make([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sum", ["x", "r", "x"], ["s"]),
                       helper.make_node("Mean", ["s", "r"], ["y"])], []), "Sum"),
    "global_max_pool": (make([helper.make_node("GlobalMaxPool", ["x"], ["y"])], []), "GlobalMaxPool"),
    "reduce_max_axes_input": (make([helper.make_node("ReduceMax", ["x", "ax"], ["y"], keepdims=0)],
                                   [i64("ax", [1, -1])], opset=18), "ReduceMax"),
    "reduce_max_all": (make([helper.make_node("ReduceMax", ["x"], ["y"])], [], opset=13), "ReduceMax"),
    "reduce_min_attr": (make([helper.make_node("ReduceMin", ["x"], ["y"], axes=[2], keepdims=1)], [], opset=13),
                        "ReduceMin"),
    "instance_norm": (make([helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-4)],
                           [f32("s", RNG.uniform(0.5, 1.5, 4)), f32("b", RNG.normal(size=4))]),
                      "InstanceNormalization"),
    "resize_nearest_scales": (make([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest")],
                                   [f32("sc", [1, 1, 2, 3])]), "Resize"),
    "resize_linear_half_pixel": (make([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear")],
                                      [f32("sc", [1, 1, 1.5, 2])]), "Resize"),
    "resize_linear_align_corners_sizes": (
        make([helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="linear",
                               coordinate_transformation_mode="align_corners")], [i64("sz", [2, 4, 9, 13])]),
        "Resize"),
    "resize_cubic_downscale": (make([helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="cubic")],
                                    [i64("sz", [2, 4, 4, 3])]), "Resize"),
    "resize_pytorch_half_pixel_3d": (
        make([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear",
                               coordinate_transformation_mode="pytorch_half_pixel")],
             [f32("sc", [1, 1, 2, 2, 0.5])], shape=[1, 2, 3, 4, 6]), "Resize"),
    "repeated_input": (make([helper.make_node("Concat", ["x", "x"], ["c"], axis=1),
                             helper.make_node("Greater", ["c", "c"], ["m"]),
                             helper.make_node("Where", ["m", "c", "c"], ["y"])], []), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_keeps_outputs(case):
    model, removed_op = CASES[case]
    onnx.checker.check_model(model, full_check=True)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    shape = [d.dim_value or 5 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (RNG.normal(size=shape) * 2).astype(np.float32)
    canonical = canonicalize_for_gradients(model)
    assert model == before, "the input model must stay untouched"
    onnx.checker.check_model(canonical, full_check=True)
    ops = {n.op_type for n in canonical.graph.node}
    if removed_op:
        assert removed_op not in ops
    names = [o for n in canonical.graph.node for o in n.output if o]
    assert len(names) == len(set(names))
    original_names = {n.name for n in model.graph.node}
    assert all(n.name.startswith(PREFIX) for n in canonical.graph.node if n.name not in original_names)
    for want, got in zip(run(model, x), run(canonical, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layernorm_gets_its_optional_outputs():
    canonical = canonicalize_for_gradients(CASES["layernorm"][0])
    (node,) = canonical.graph.node
    assert len(node.output) == 3 and all(o.startswith(PREFIX) for o in node.output[1:])


def test_layernorms_sharing_weights_get_their_own_copies():
    canonical = canonicalize_for_gradients(CASES["layernorm_shared_weights"][0])
    norms = [n for n in canonical.graph.node if n.op_type == "LayerNormalization"]
    assert len({n.input[1] for n in norms}) == 2 and len({n.input[2] for n in norms}) == 2


def test_batchnorm_constants_are_folded_per_channel():
    model, _ = CASES["batchnorm_const"]
    canonical = canonicalize_for_gradients(model)
    assert [n.op_type for n in canonical.graph.node] == ["Mul", "Add"]
    scale = numpy_helper.to_array(next(t for t in canonical.graph.initializer if t.name.endswith("/scale")))
    g, _, _, var = (numpy_helper.to_array(t) for t in bn_params())  # shape only
    assert scale.shape == (4, 1, 1) and g.shape == (4,) and var.shape == (4,)
    assert not {"g", "mu", "var"} & {t.name for t in canonical.graph.initializer}


def test_untouched_graph_is_equal():
    model = make([helper.make_node("Relu", ["x"], ["y"])], [])
    assert canonicalize_for_gradients(model).graph == model.graph


def test_torch_exported_cnn_with_batchnorm_and_dropout(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.BatchNorm2d(8), torch.nn.Hardswish(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 5))
    with torch.no_grad():  # non-trivial running statistics
        for m in net:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamo=False, do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    model = onnx.load(str(path))
    canonical = canonicalize_for_gradients(model)
    onnx.checker.check_model(canonical, full_check=True)
    ops = {n.op_type for n in canonical.graph.node}
    assert not ops & {"BatchNormalization", "Dropout", "HardSwish", "HardSigmoid"}
    want = run(model, x.numpy())[0]
    np.testing.assert_allclose(run(canonical, x.numpy())[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want, net(x).detach().numpy(), rtol=1e-4, atol=1e-4)
