"""When neither gradient backend can differentiate an op, ``auto`` says so once, names the op and the
node, and points to the one way left (a node after it), never to a backend that has already failed.
Runs in both environments: with onnxruntime-training (both backends tried) and without it."""
import numpy as np
import onnx
import pytest
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


def test_api_message_names_the_op_once_and_sends_nowhere_circular():
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    explainer = Explainer(softsign_classifier(), "/features/conv/Conv", cache=False)
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
