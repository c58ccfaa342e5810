"""The ``auto`` gradient backend on ops that once stopped it. When neither backend can differentiate an
op, it says so once, names the op and the node, and points to the one way left (a node after it), never
to a backend that has already failed; an LSTM on the path now goes to the portable rules.
Runs in both environments: with onnxruntime-training (both backends tried) and without it."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import tiny_classifier, with_unruled_op
from user_path import assert_error, run_cli

from onnxcam import Explainer
from onnxcam.errors import OnnxcamError
from onnxcam.gradients import ort_training_available

NODE = "Softsign (node /features/softsign)"


def softsign_classifier() -> onnx.ModelProto:
    """The tiny classifier with a Softsign after its Relu: an op neither backend has a gradient for
    (onnxruntime-training 1.19.2 registers none; the portable backend has no rule)."""
    model = with_unruled_op(tiny_classifier())
    node = next(n for n in model.graph.node if n.op_type == "Einsum")
    node.op_type, node.name = "Softsign", "/features/softsign"
    del node.attribute[:]
    onnx.checker.check_model(model, full_check=True)
    return model


if ort_training_available():
    EXPECTED = (f"neither gradient backend can differentiate {NODE} on the path from the chosen node to the score "
                f"(portable backend: no gradient rule for this op; onnxruntime-training cannot differentiate {NODE} "
                "between the score and the chosen node); pick a node after it, closer to the output")
else:
    EXPECTED = (f"no portable gradient rule for {NODE}: no gradient rule for this op; install "
                "onnxcam[training-cpu] for the ort-training backend, or pick a node closer to the output")


@pytest.mark.parametrize("backend", ["auto", "ort-training"])
def test_api_message_names_the_op_once_and_sends_nowhere_circular(backend):
    """Also when ort-training was asked for by name: its usual advice, the portable backend, is no way
    out here either."""
    if backend == "ort-training" and not ort_training_available():
        pytest.skip("needs onnxruntime-training")
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    explainer = Explainer(softsign_classifier(), "/features/conv/Conv", grad_backend=backend, cache=False)
    with pytest.raises(OnnxcamError) as error:
        explainer.explain(x, "gradcam")
    assert str(error.value) == EXPECTED
    assert "--grad-backend portable" not in str(error.value)
    # a node after the op: both backends' problem is gone, and auto differentiates it
    after = Explainer(softsign_classifier(), "/features/softsign", cache=False)
    assert after.explain(x).maps.shape == (2, 8, 8)


def test_cli_prints_the_same_single_line(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(softsign_classifier(), str(model))
    image = tmp_path / "i.npy"
    np.save(image, np.random.default_rng(1).normal(size=(3, 8, 8)).astype(np.float32))
    result = run_cli("explain", model, image, "--node", "/features/conv/Conv", "--out", tmp_path / "o")
    assert_error(result, EXPECTED)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def conv_lstm_classifier(length=10, channels=4, hidden=3, classes=3, seed=0) -> onnx.ModelProto:
    """input (N, 2, L) -> Conv1d -> Relu 'act' -> time-major -> bidirectional LSTM -> mean over time ->
    Gemm: the sequence net whose LSTM once stopped both backends (a hand-built graph, no torch)."""
    rng = np.random.default_rng(seed)
    consts = {"conv_w": rng.normal(0, 0.5, (channels, 2, 3)), "W": rng.normal(0, 0.5, (2, 4 * hidden, channels)),
              "R": rng.normal(0, 0.5, (2, 4 * hidden, hidden)), "B": rng.normal(0, 0.1, (2, 8 * hidden)),
              "fc_w": rng.normal(0, 1.0, (classes, 2 * hidden)), "shape": np.array([0, -1])}
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], name="/conv/Conv", pads=[1, 1]),
        helper.make_node("Relu", ["conv"], ["act"], name="/features/relu/Relu"),
        helper.make_node("Transpose", ["act"], ["tnc"], perm=[2, 0, 1], name="/to_time_major"),
        helper.make_node("LSTM", ["tnc", "W", "R", "B"], ["Y"], name="/lstm/LSTM", hidden_size=hidden,
                         direction="bidirectional"),
        helper.make_node("ReduceMean", ["Y"], ["mean"], axes=[0], keepdims=0, name="/mean"),   # (2, N, H)
        helper.make_node("Transpose", ["mean"], ["ndh"], perm=[1, 0, 2], name="/batch_first"),
        helper.make_node("Reshape", ["ndh", "shape"], ["flat"], name="/flat"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_lstm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, length])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_auto_differentiates_an_lstm_and_the_map_matches_finite_differences():
    """Where 'no portable gradient rule for LSTM' (then ort-training's 'cannot differentiate LSTM')
    was the answer, auto now takes the portable rules; Grad-CAM from finite-difference gradients of the
    layers after 'act' (a sub-model fed with act) is the oracle."""
    model = conv_lstm_classifier()
    x = np.random.default_rng(2).normal(size=(2, 2, 10)).astype(np.float32)
    explainer = Explainer(model, "/features/relu/Relu", cache=False)
    maps = explainer.explain(x, "gradcam", targets=[0, 2]).maps
    assert explainer.gradient_backend_used == "portable"

    head = onnx.ModelProto()
    head.CopyFrom(model)
    del head.graph.node[:2]
    del head.graph.input[:]
    head.graph.input.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, ["N", 4, 10]))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    run = ort.InferenceSession(head.SerializeToString(), options, providers=["CPUExecutionProvider"])
    conv_model = onnx.ModelProto()
    conv_model.CopyFrom(model)
    conv_model.graph.output.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, None))
    act = ort.InferenceSession(conv_model.SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(["act"], {"input": x})[0]
    eps, grads = 1e-2, np.zeros_like(act, dtype=np.float64)
    for n, target in enumerate([0, 2]):
        for i in np.ndindex(act.shape[1:]):
            moved = [act.copy(), act.copy()]
            moved[0][(n,) + i] += eps
            moved[1][(n,) + i] -= eps
            up, down = (run.run(["logits"], {"act": m})[0][n, target] for m in moved)
            grads[(n,) + i] = (float(up) - float(down)) / (2 * eps)
    cam = np.maximum((grads.mean(2, keepdims=True) * act).sum(1), 0)
    cam = cam - cam.min(1, keepdims=True)
    cam = cam / (cam.max(1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(maps, cam, atol=2e-5)   # measured 1.4e-6 (float32 differences, eps 1e-2)


def test_conv_lstm_through_the_cli_equals_the_api(tmp_path):
    """`onnxcam explain` on the sequence net (default gradient backend): the .npy map is the API's,
    and a real map."""
    model = conv_lstm_classifier()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    signal = np.random.default_rng(4).normal(size=(2, 10)).astype(np.float32)
    np.save(tmp_path / "signal.npy", signal)
    for method in ("gradcam", "layercam"):
        result = run_cli("explain", path, tmp_path / "signal.npy", "--node", "/features/relu/Relu", "--method",
                         method, "--out", tmp_path / "out")
        assert result.exit_code == 0, result.stderr
        from_cli = np.load(tmp_path / "out" / f"signal_{method}.npy")
        from_api = Explainer(model, "/features/relu/Relu").explain(signal[None], method=method).maps[0]
        assert from_cli.shape == (10,)
        np.testing.assert_array_equal(from_cli, from_api)
        assert from_api.max() > 0.999 and from_api.min() == 0.0
