"""ort-training backend: gradients of the explainer's score head against exact values and finite differences.

Runs only where onnxruntime is a training build (e.g. /work/venvs/train); skipped elsewhere.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.errors import OnnxcamError
from onnxcam.gradients import gradient_name, ort_training_available

if not ort_training_available():
    pytest.skip("needs a training build of onnxruntime (onnxruntime-training)", allow_module_level=True)

import onnxruntime as ort  # noqa: E402

from onnxcam.gradients.ort_training import build  # noqa: E402

WEIGHTS = "onnxcam_target_weights"
K = 5


class Graph:
    """Tiny builder: nodes, initializers and a counter for names."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def const(self, name, value, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def random(self, name, shape, scale=1.0):
        return self.const(name, self.rng.normal(size=shape) * scale)

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"n/{output}", **attrs))
        return output

    def batchnorm(self, x, c, out):
        params = [self.const(f"{out}_g", self.rng.uniform(0.5, 1.5, c)),
                  self.const(f"{out}_b", self.rng.normal(size=c) * 0.1),
                  self.const(f"{out}_mean", self.rng.normal(size=c) * 0.1),
                  self.const(f"{out}_var", self.rng.uniform(0.5, 1.5, c))]
        return self.node("BatchNormalization", [x] + params, out, epsilon=1e-5)

    def score_head(self, z):
        """Exactly the explainer's head: explicit rows of W, or one-hot arg-max where a row is all zero."""
        self.node("ArgMax", [z], "argmax", axis=1, keepdims=0)
        self.node("OneHot", ["argmax", self.const("depth", K, np.int64), self.const("on_off", [0, 1])],
                  "onehot", axis=-1)
        self.node("Cast", ["onehot"], "w_auto", to=TensorProto.FLOAT)
        self.node("Abs", [WEIGHTS], "w_abs")
        self.node("ReduceSum", ["w_abs", self.const("axis1", [1], np.int64)], "row_sum", keepdims=1)
        self.node("Greater", ["row_sum", self.const("zero", 0.0)], "has_bool")
        self.node("Cast", ["has_bool"], "has", to=TensorProto.FLOAT)
        self.node("Sub", [self.const("one", 1.0), "has"], "no_target")
        self.node("Mul", ["w_auto", "no_target"], "w_fill")
        self.node("Add", [WEIGHTS, "w_fill"], "w_eff")
        self.node("Mul", [z, "w_eff"], "weighted")
        return self.node("ReduceSum", ["weighted"], "score", keepdims=0)

    def model(self, x_shape, outputs, opset=17):
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
                  helper.make_tensor_value_info(WEIGHTS, TensorProto.FLOAT, ["N", K])]
        graph = helper.make_graph(self.nodes, "g", inputs,
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model


def small_cnn(clip=False, softmax=False, opset=17):
    """Conv+BN+Relu, Conv+BN+Relu (or Clip 0..6 = ReLU6), GlobalAveragePool, Flatten, Gemm, score head."""
    g = Graph()
    g.node("Conv", ["x", g.random("w1", (4, 3, 3, 3), 0.4), g.random("b1", 4, 0.1)], "c1", pads=[1, 1, 1, 1])
    g.batchnorm("c1", 4, "bn1")
    g.node("Relu", ["bn1"], "a1")
    g.node("Conv", ["a1", g.random("w2", (6, 4, 3, 3), 0.4), g.random("b2", 6, 0.1)], "c2", pads=[1, 1, 1, 1])
    g.batchnorm("c2", 6, "bn2")
    if clip:
        g.node("Clip", ["bn2", g.const("lo", 0.0), g.const("hi", 6.0)], "a2")
    else:
        g.node("Relu", ["bn2"], "a2")
    g.node("GlobalAveragePool", ["a2"], "gap")
    g.node("Flatten", ["gap"], "flat")
    logits = g.node("Gemm", ["flat", g.random("fc_w", (K, 6)), g.random("fc_b", K)], "logits", transB=1)
    z = g.node("Softmax", [logits], "probs", axis=-1) if softmax else logits
    g.score_head(z)
    return g.model(["N", 3, 8, 8], [z]), g


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_named(model, feeds):
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def with_perturbation(model, tensor, score="score"):
    """Same model with an input ``delta`` added to ``tensor`` before its consumers; score as output."""
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(model)
    graph = perturbed.graph
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = tensor + "_perturbed"
    graph.node.append(helper.make_node("Add", [tensor, "delta"], [tensor + "_perturbed"]))
    graph.input.append(helper.make_tensor_value_info("delta", TensorProto.FLOAT, None))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(score, TensorProto.FLOAT, []))
    return perturbed


def finite_difference_check(model, tensor, feeds, gradient, eps=1e-2, coordinates=12, seed=1, score="score"):
    """Finite differences on random coordinates and along one random direction.

    A coordinate within eps of a ReLU/Clip kink has different one-sided slopes; the analytic gradient
    then equals one of them, so the forward, backward and central differences are all accepted.
    """
    rng = np.random.default_rng(seed)
    sess = session(with_perturbation(model, tensor, score))

    def score_at(delta):
        return float(sess.run(None, {**feeds, "delta": delta.astype(np.float32)})[0])

    def close(analytic, delta, step):
        here, up, down = score_at(0 * delta), score_at(delta), score_at(-delta)
        slopes = [(up - down) / (2 * step), (up - here) / step, (here - down) / step]
        return min(abs(s - analytic) - 1e-2 * abs(s) for s in slopes) <= 1e-3, (slopes, analytic)

    shape = gradient.shape
    for _ in range(coordinates):
        index = tuple(int(rng.integers(0, d)) for d in shape)
        delta = np.zeros(shape)
        delta[index] = eps
        ok, detail = close(float(gradient[index]), delta, eps)
        assert ok, (index, detail)
    direction = rng.normal(size=shape)
    direction *= 1e-3 / np.linalg.norm(direction)
    ok, detail = close(float((gradient * direction).sum()) * 1e3, direction, 1e-3)
    assert ok, detail


def feeds_for(batch=3, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 3, 8, 8)).astype(np.float32)
    weights = np.zeros((batch, K), np.float32)  # row 0: all zero = arg-max class
    weights[1, 2] = 1.0
    if batch > 2:
        weights[2, 4] = 1.0
    return {"x": x, WEIGHTS: weights}


def test_last_layer_gradient_is_exact_for_each_row_of_the_head():
    model, g = small_cnn()
    feeds = feeds_for()
    augmented = build(model, "score", ["a2"])
    onnx.checker.check_model(augmented, full_check=True)
    out = run_named(augmented, feeds)
    assert list(out) == ["logits", gradient_name("a2")]
    reference = run_named(model, feeds)["logits"]
    np.testing.assert_allclose(out["logits"], reference, rtol=1e-6, atol=1e-6)
    targets = feeds[WEIGHTS].copy()
    targets[0, reference[0].argmax()] = 1.0
    fc_w = numpy_helper.to_array(next(t for t in g.inits if t.name == "fc_w"))
    per_channel = targets @ fc_w / 64.0  # GlobalAveragePool over 8x8 spreads evenly
    expected = np.broadcast_to(per_channel[:, :, None, None], (3, 6, 8, 8))
    np.testing.assert_allclose(out[gradient_name("a2")], expected, rtol=1e-5, atol=1e-7)


def test_deep_tensors_match_finite_differences():
    model, _ = small_cnn()
    feeds = feeds_for()
    wrt = ["a1", "c1", "bn2"]
    out = run_named(build(model, "score", wrt), feeds)
    for tensor in wrt:
        finite_difference_check(model, tensor, feeds, out[gradient_name(tensor)])


def test_samples_in_a_batch_do_not_interact():
    model, _ = small_cnn()
    feeds = feeds_for()
    augmented = build(model, "score", ["a1"])
    together = run_named(augmented, feeds)[gradient_name("a1")]
    for n in range(3):
        alone = run_named(augmented, {k: v[n:n + 1] for k, v in feeds.items()})[gradient_name("a1")]
        np.testing.assert_allclose(together[n:n + 1], alone, rtol=1e-5, atol=1e-7)


def test_zero_row_means_the_arg_max_class():
    model, _ = small_cnn()
    feeds = feeds_for()
    augmented = build(model, "score", ["a1"])
    automatic = run_named(augmented, feeds)
    explicit = dict(feeds)
    explicit[WEIGHTS] = feeds[WEIGHTS].copy()
    explicit[WEIGHTS][0, automatic["logits"][0].argmax()] = 1.0
    np.testing.assert_allclose(run_named(augmented, explicit)[gradient_name("a1")], automatic[gradient_name("a1")],
                               rtol=1e-6, atol=1e-8)


def test_relu6_clip_and_softmax_output():
    model, _ = small_cnn(clip=True, softmax=True)
    feeds = feeds_for()
    feeds["x"] *= 3  # reach both ends of the Clip
    out = run_named(build(model, "score", ["a2", "a1"]), feeds)
    for tensor in ("a2", "a1"):
        finite_difference_check(model, tensor, feeds, out[gradient_name(tensor)], eps=1e-3)


def test_only_the_backward_path_to_the_chosen_tensor_is_built():
    model, _ = small_cnn()
    augmented = build(model, "score", ["a2"])
    grads = [n for n in augmented.graph.node if n.domain == "com.microsoft" or n.op_type.endswith("Grad")]
    assert not [n for n in grads if n.op_type == "ConvGrad"], "nothing upstream of a2 should be differentiated"
    deeper = build(model, "score", ["a1"])
    (conv_grad,) = [n for n in deeper.graph.node if n.op_type == "ConvGrad"]
    assert list(conv_grad.output)[1:] in ([], ["", ""]), "no weight or bias gradients"
    produced = {o for n in deeper.graph.node for o in n.output}
    assert not {"w1_grad", "w2_grad", "x_grad", "c1_grad"} & produced


def transformer_block():
    """Tokens -> LayerNorm -> qkv MatMul -> Split -> attention (Softmax) -> residual -> LayerNorm with the
    same weights -> Erf-GELU MLP
    -> ReduceMean over tokens (opset 18 axes input) -> Gemm -> score head."""
    g = Graph(seed=3)
    d = 8
    g.node("LayerNormalization", ["x", g.const("ln_g", g.rng.uniform(0.5, 1.5, d)),
                                  g.random("ln_b", d, 0.1)], "ln", axis=-1)
    g.node("MatMul", ["ln", g.random("w_qkv", (d, 3 * d), 0.4)], "qkv")
    g.nodes.append(helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=-1, num_outputs=3, name="split"))
    g.node("Transpose", ["k"], "k_t", perm=[0, 2, 1])
    g.node("MatMul", ["q", "k_t"], "logits_att")
    g.node("Mul", ["logits_att", g.const("inv_sqrt_d", 1 / np.sqrt(d))], "scaled")
    g.node("Softmax", ["scaled"], "attention", axis=-1)
    g.node("MatMul", ["attention", "v"], "mixed")
    g.node("Add", ["x", "mixed"], "residual")
    g.node("LayerNormalization", ["residual", "ln_g", "ln_b"], "ln2", axis=-1)  # weights shared, as in exports
    g.node("MatMul", ["ln2", g.random("w_mlp", (d, d), 0.4)], "hidden")
    g.node("Div", ["hidden", g.const("sqrt2", np.sqrt(2))], "hidden_scaled")
    g.node("Erf", ["hidden_scaled"], "erf")
    g.node("Add", ["erf", g.const("one_f", 1.0)], "erf_1")
    g.node("Mul", ["hidden", "erf_1"], "gelu_2")
    g.node("Mul", ["gelu_2", g.const("half", 0.5)], "gelu")
    g.node("ReduceMean", ["gelu", g.const("tokens", [1], np.int64)], "pooled", keepdims=0)
    g.node("Gemm", ["pooled", g.random("head_w", (K, d)), g.random("head_b", K)], "logits", transB=1)
    g.score_head("logits")
    return g.model(["N", 5, d], ["logits"], opset=18)


def test_transformer_block_with_layernorm_split_and_attention():
    model = transformer_block()
    rng = np.random.default_rng(4)
    feeds = {"x": rng.normal(size=(2, 5, 8)).astype(np.float32), WEIGHTS: np.eye(K, dtype=np.float32)[[3, 0]]}
    wrt = ["ln", "attention", "residual"]
    out = run_named(build(model, "score", wrt), feeds)
    np.testing.assert_allclose(out["logits"], run_named(model, feeds)["logits"], rtol=1e-6, atol=1e-6)
    for tensor in wrt:
        finite_difference_check(model, tensor, feeds, out[gradient_name(tensor)], eps=1e-3)


@pytest.mark.parametrize("opset", [11, 23])
def test_opsets_outside_the_runtime_range_are_converted(opset):
    model, _ = small_cnn(clip=True)
    model.opset_import[0].version = opset
    if opset == 11:  # ReduceSum takes axes as an attribute before opset 13
        for node in model.graph.node:
            if node.op_type == "ReduceSum" and len(node.input) == 2:
                del node.input[1]
                node.attribute.append(helper.make_attribute("axes", [1]))
    feeds = feeds_for()
    out = run_named(build(model, "score", ["a1"]), feeds)
    reference, _ = small_cnn(clip=True)
    expected = run_named(build(reference, "score", ["a1"]), feeds)[gradient_name("a1")]
    np.testing.assert_allclose(out[gradient_name("a1")], expected, rtol=1e-5, atol=1e-7)


def test_an_opset_that_cannot_be_converted_says_what_to_do():
    nodes = [helper.make_node("RMSNormalization", ["x", "s"], ["r"], axis=-1),
             helper.make_node("ReduceSum", ["r"], ["score"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    with pytest.raises(OnnxcamError, match="opset 23.*re-export the model with opset 21"):
        build(model, "score", ["r"])


def test_an_op_without_gradient_is_named_in_the_error():
    g = Graph()
    g.node("Conv", ["x", g.random("w", (8, 3, 3, 3))], "c", pads=[1, 1, 1, 1])
    g.node("DepthToSpace", ["c"], "d2s", blocksize=2)
    g.node("GlobalAveragePool", ["d2s"], "gap")
    g.node("Flatten", ["gap"], "flat")
    g.node("Gemm", ["flat", g.random("fc", (K, 2))], "logits", transB=1)
    g.score_head("logits")
    model = g.model(["N", 3, 8, 8], ["logits"])
    with pytest.raises(OnnxcamError, match="DepthToSpace"):
        build(model, "score", ["c"])
    with pytest.raises(OnnxcamError, match="not in the model"):
        build(model, "score", ["no_such_tensor"])
    with pytest.raises(OnnxcamError, match="does not depend"):
        build(model, "score", ["argmax"])


def _op_between_conv_and_pool(case):
    """Conv -> <op under test> -> GlobalAveragePool -> Flatten -> Gemm -> score head; wrt = the Conv output."""
    g = Graph(seed=5)
    g.node("Conv", ["x", g.random("w", (4, 3, 3, 3), 0.5), g.random("b", 4, 0.2)], "conv", pads=[1, 1, 1, 1])
    channels = 4
    if case == "hardswish":
        g.node("HardSwish", ["conv"], "act")
    elif case == "hardsigmoid":
        g.node("HardSigmoid", ["conv"], "act", alpha=0.3, beta=0.4)
    elif case == "prelu":
        g.node("PRelu", ["conv", g.const("slope", [[[0.1]], [[0.2]], [[0.3]], [[0.4]]])], "act")
    elif case == "elu_selu":
        g.node("Elu", ["conv"], "elu", alpha=0.8)
        g.node("Selu", ["elu"], "act")
    elif case == "mish_softplus":
        g.node("Mish", ["conv"], "mish")
        g.node("Softplus", ["mish"], "act")
    elif case == "sum_mean":
        g.node("Relu", ["conv"], "relu")
        g.node("Sum", ["conv", "relu", "conv"], "sum")
        g.node("Mean", ["sum", "relu"], "act")
    elif case == "instance_norm":
        g.node("InstanceNormalization", ["conv", g.random("in_s", 4), g.random("in_b", 4)], "act")
    elif case == "resize_linear":
        g.node("Resize", ["conv", "", g.const("scales", [1, 1, 2, 1.5])], "act", mode="linear")
    elif case == "dropout_split":
        g.node("Dropout", ["conv", g.const("ratio", 0.4)], "dropped")
        g.nodes.append(helper.make_node("Split", ["dropped", g.const("parts", [3, 1], np.int64)],
                                        ["act", "unused"], axis=1))
        channels = 3
    elif case == "max_pools":
        g.node("GlobalMaxPool", ["conv"], "gmp")
        g.node("ReduceMax", ["conv", g.const("axes", [-1], np.int64)], "rmax", keepdims=1)
        g.node("Add", ["rmax", "gmp"], "act")
    g.node("GlobalAveragePool", ["act"], "gap")
    g.node("Flatten", ["gap"], "flat")
    g.node("Gemm", ["flat", g.random("fc", (K, channels)), g.random("fc_b", K)], "logits", transB=1)
    g.score_head("logits")
    return g.model(["N", 3, 8, 8], ["logits"], opset=18)


@pytest.mark.parametrize("case", ["hardswish", "hardsigmoid", "prelu", "elu_selu", "mish_softplus", "sum_mean",
                                  "instance_norm", "resize_linear", "dropout_split", "max_pools"])
def test_canonicalized_ops_have_correct_gradients(case):
    model = _op_between_conv_and_pool(case)
    feeds = feeds_for(batch=2)
    feeds["x"] *= 2
    out = run_named(build(model, "score", ["conv"]), feeds)
    np.testing.assert_allclose(out["logits"], run_named(model, feeds)["logits"], rtol=1e-5, atol=1e-5)
    finite_difference_check(model, "conv", feeds, out[gradient_name("conv")], eps=1e-3)
