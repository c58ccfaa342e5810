"""find_classifier_weights on hand-built graphs: each supported head pattern is checked by running the
model with ONNX Runtime and comparing its logits with weight @ mean_S(A) + bias; then the refusals."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.classifier_head import find_classifier_weights
from onnxcam.errors import OnnxcamError

C, K = 3, 4
RNG = np.random.default_rng(0)
W = RNG.standard_normal((K, C)).astype(np.float32)
B = RNG.standard_normal(K).astype(np.float32)


def const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def build(nodes, initializers, act_shape, opset=13):
    """x → Relu (node 'conv', tensor 'act') → ``nodes`` → 'logits'; 'act' is also an output."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["act"], name="conv")] + nodes, "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, act_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None]),
         helper.make_tensor_value_info("act", TensorProto.FLOAT, act_shape)],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)  # older ORTs too
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_head_reproduces_logits(model, expected_layout, expected_weight=None, expected_bias=None):
    head = find_classifier_weights(model, "act")
    assert head.layout == expected_layout
    assert head.weight.dtype == np.float32 and head.weight.shape == (K, C)
    if expected_weight is not None:
        np.testing.assert_allclose(head.weight, expected_weight, rtol=1e-6)
    if expected_bias is not None:
        np.testing.assert_allclose(head.bias, expected_bias, rtol=1e-6)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = RNG.standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, act = session.run(["logits", "act"], {"x": x})
    spatial = tuple(range(2, act.ndim)) if expected_layout == "channels_first" else tuple(range(1, act.ndim - 1))
    pooled = act.mean(axis=spatial)
    bias = 0 if head.bias is None else head.bias
    np.testing.assert_allclose(logits.reshape(len(x), K), pooled @ head.weight.T + bias, rtol=1e-5, atol=1e-5)
    return head


def test_nchw_gap_flatten_gemm():
    model = build([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                   helper.make_node("Flatten", ["p"], ["f"]),
                   helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)],
                  [const("W", W), const("B", B)], [2, C, 4, 5])
    assert_head_reproduces_logits(model, "channels_first", W, B)


def test_dropout_reshape_gemm_with_alpha_beta_and_constant_node_weights():
    model = build([helper.make_node("Identity", ["act"], ["a2"]),
                   helper.make_node("GlobalAveragePool", ["a2"], ["p"]),
                   helper.make_node("Dropout", ["p"], ["d"]),
                   helper.make_node("Reshape", ["d", "shape"], ["f"]),
                   helper.make_node("Constant", [], ["Wt"], value=numpy_helper.from_array(W.T.copy())),
                   helper.make_node("Gemm", ["f", "Wt", "B"], ["logits"], alpha=2.0, beta=0.5)],
                  [const("shape", np.array([-1, C], np.int64)), const("B", B[None])], [2, C, 3, 3])
    assert_head_reproduces_logits(model, "channels_first", 2 * W, 0.5 * B)


def test_nhwc_reducemean_squeeze_matmul_add_opset18():
    model = build([helper.make_node("ReduceMean", ["act", "axes"], ["p"], keepdims=1),
                   helper.make_node("Squeeze", ["p", "axes"], ["f"]),
                   helper.make_node("MatMul", ["f", "Wt"], ["m"]),
                   helper.make_node("Add", ["m", "B"], ["logits"])],
                  [const("axes", np.array([1, 2], np.int64)), const("Wt", W.T.copy()), const("B", B)],
                  [2, 4, 5, C], opset=18)
    assert_head_reproduces_logits(model, "channels_last", W, B)


def test_nhwc_reducemean_then_transpose_and_reshape():
    model = build([helper.make_node("ReduceMean", ["act"], ["p"], axes=[1, 2], keepdims=1),
                   helper.make_node("Transpose", ["p"], ["t"], perm=[0, 3, 1, 2]),
                   helper.make_node("Reshape", ["t", "shape"], ["f"]),
                   helper.make_node("MatMul", ["f", "Wt"], ["m"]),
                   helper.make_node("Add", ["B", "m"], ["logits"])],
                  [const("shape", np.array([0, -1], np.int64)), const("Wt", W.T.copy()), const("B", B)],
                  [2, 3, 3, C])
    assert_head_reproduces_logits(model, "channels_last", W, B)


def test_transpose_before_pooling_reports_the_activation_layout():
    # NCHW activation transposed to NHWC (as TensorFlow converters do), pooled without keepdims
    model = build([helper.make_node("Transpose", ["act"], ["t"], perm=[0, 2, 3, 1]),
                   helper.make_node("ReduceMean", ["t"], ["f"], axes=[1, 2], keepdims=0),
                   helper.make_node("MatMul", ["f", "Wt"], ["logits"])],
                  [const("Wt", W.T.copy())], [2, C, 4, 4])
    head = assert_head_reproduces_logits(model, "channels_first", W)
    assert head.bias is None


def test_conv_1x1_classifier():
    model = build([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                   helper.make_node("Conv", ["p", "Wc", "B"], ["c"]),
                   helper.make_node("Flatten", ["c"], ["logits"])],
                  [const("Wc", W.reshape(K, C, 1, 1)), const("B", B)], [2, C, 5, 5])
    assert_head_reproduces_logits(model, "channels_first", W, B)


def test_1d_reducemean_negative_axis_and_3d_gap():
    one_d = build([helper.make_node("ReduceMean", ["act"], ["f"], axes=[-1], keepdims=0),
                   helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)],
                  [const("W", W), const("B", B)], [2, C, 7])
    assert_head_reproduces_logits(one_d, "channels_first", W, B)
    three_d = build([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                     helper.make_node("Flatten", ["p"], ["f"]),
                     helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)],
                    [const("W", W)], [2, C, 2, 3, 4])
    assert_head_reproduces_logits(three_d, "channels_first", W)


def test_run_time_reshape_like_torch_view():
    # x.view(x.size(0), -1): the shape is computed from the pooled tensor by Shape → Gather → Concat
    model = build([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                   helper.make_node("Shape", ["p"], ["s"]),
                   helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
                   helper.make_node("Unsqueeze", ["n", "zero_axis"], ["n1"]),
                   helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
                   helper.make_node("Reshape", ["p", "shape"], ["f"]),
                   helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)],
                  [const("zero", np.array(0, np.int64)), const("zero_axis", np.array([0], np.int64)),
                   const("minus_one", np.array([-1], np.int64)), const("W", W), const("B", B)], [2, C, 3, 3])
    assert_head_reproduces_logits(model, "channels_first", W, B)


def test_torch_dynamo_pattern_reducemean_axes_input_then_gemm():
    # what torch.onnx.export(dynamo=True) writes for fc(relu(conv(x)).mean((2, 3)))
    model = build([helper.make_node("ReduceMean", ["act", "axes"], ["f"], keepdims=0),
                   helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)],
                  [const("axes", np.array([2, 3], np.int64)), const("W", W), const("B", B)], [2, C, 4, 4],
                  opset=18)
    assert_head_reproduces_logits(model, "channels_first", W, B)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_export_of_a_resnet_style_head():
    torch = pytest.importorskip("torch")
    import io

    net = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(C, K)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 2, 8, 8),), buffer, dynamo=False, input_names=["x"],
                      output_names=["logits"])
    model = onnx.load_from_string(buffer.getvalue())
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    head = find_classifier_weights(model, relu.output[0])
    assert head.layout == "channels_first"
    np.testing.assert_allclose(head.weight, net[4].weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(head.bias, net[4].bias.detach().numpy(), rtol=1e-6)


# ----- refusals -----

def refusal(nodes, initializers, shape=(2, C, 4, 4)):
    with pytest.raises(OnnxcamError) as err:
        find_classifier_weights(build(nodes, initializers, list(shape)), "act")
    message = str(err.value)
    assert message.startswith("CAM needs the node to feed global average pooling and then a linear classifier")
    assert message.endswith("— use --method gradcam") and "\n" not in message
    return message


def test_refuses_a_non_linear_op_before_pooling():
    message = refusal([helper.make_node("Relu", ["act"], ["r"]),
                       helper.make_node("GlobalAveragePool", ["r"], ["p"]),
                       helper.make_node("Flatten", ["p"], ["f"]),
                       helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)], [const("W", W)])
    assert "node 'conv' feeds Relu instead" in message


def test_refuses_a_non_linear_op_between_pooling_and_classifier():
    message = refusal([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                       helper.make_node("Flatten", ["p"], ["f"]),
                       helper.make_node("Relu", ["f"], ["r"]),
                       helper.make_node("Gemm", ["r", "W"], ["logits"], transB=1)], [const("W", W)])
    assert "feeds GlobalAveragePool → Flatten → Relu instead" in message


def test_refuses_max_pooling_and_partial_means():
    assert "feeds GlobalMaxPool instead" in refusal(
        [helper.make_node("GlobalMaxPool", ["act"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)], [const("W", W)])
    assert "ReduceMean (axes [2]" in refusal(
        [helper.make_node("ReduceMean", ["act"], ["p"], axes=[2], keepdims=0),
         helper.make_node("ReduceMean", ["p"], ["f"], axes=[2], keepdims=0),
         helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)], [const("W", W)])


def test_weights_computed_from_constants_alone_are_folded():
    """Relu(Wt) of a constant Wt is a constant: the graph view folds it, so CAM reads Relu(Wt)."""
    model = build([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                   helper.make_node("Flatten", ["p"], ["f"]),
                   helper.make_node("Transpose", ["f"], ["ft"]),
                   helper.make_node("Relu", ["Wt"], ["computed"]),
                   helper.make_node("Gemm", ["ft", "computed"], ["logits"], transA=1)],
                  [const("Wt", W.T.copy())], [2, C, 4, 4])
    head = find_classifier_weights(model, "act")
    np.testing.assert_array_equal(head.weight, np.maximum(W, 0))


def test_refuses_weights_that_are_not_constants_and_branching_activations():
    graph_w = refusal([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                       helper.make_node("Flatten", ["p"], ["f"]),
                       helper.make_node("Transpose", ["f"], ["ft"]),
                       helper.make_node("ReduceMax", ["x"], ["gain"], keepdims=0),
                       helper.make_node("Mul", ["Wt", "gain"], ["computed"]),   # depends on the input
                       helper.make_node("Gemm", ["ft", "computed"], ["logits"], transA=1)],
                      [const("Wt", W.T.copy())])
    assert "Gemm (weights are not constants)" in graph_w
    branching = refusal([helper.make_node("GlobalAveragePool", ["act"], ["p"]),
                         helper.make_node("Add", ["act", "act"], ["s"]),
                         helper.make_node("Flatten", ["p"], ["f"]),
                         helper.make_node("Gemm", ["f", "W"], ["g"], transB=1),
                         helper.make_node("ReduceSum", ["s"], ["rs"], keepdims=0),
                         helper.make_node("Add", ["g", "rs"], ["logits"])], [const("W", W)])
    assert "several nodes" in branching
