"""Surgery on hand-built graphs: logits lookup, the target-score head's exact values, exposed outputs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxcam.model import load_model
from onnxcam.surgery import (SCORE, TARGET_WEIGHTS, add_target_head, build_forward_model, copy_model,
                             find_logits, set_outputs)
from onnxcam.errors import OnnxcamError
from tiny_models import tiny_classifier


def run(model, feeds, outputs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def test_logits_are_the_softmax_input():
    model = tiny_classifier(softmax=True)
    assert find_logits(model) == "logits"
    assert find_logits(model, probabilities=True) == "probs"
    assert find_logits(tiny_classifier(softmax=False)) == "logits"


def test_logits_found_through_identity_after_softmax():
    model = tiny_classifier(softmax=True)
    model.graph.node.append(helper.make_node("Identity", ["probs"], ["out"]))
    set_outputs(model, ["out"])
    assert find_logits(model) == "logits"


def _head_model():
    model = copy_model(tiny_classifier())
    score = add_target_head(model, "logits")
    set_outputs(model, ["logits", score])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_head_scores_argmax_for_zero_rows_and_weights_otherwise():
    model = _head_model()
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    z = run(tiny_classifier(softmax=False), {"input": x}, ["logits"])[0]
    weights = np.zeros((4, 3), np.float32)
    weights[1, 2] = 1.0                      # explicit class 2
    weights[2] = [0.5, 0.0, 2.0]             # a soft weighting
    logits, score = run(model, {"input": x, TARGET_WEIGHTS: weights}, ["logits", SCORE])
    np.testing.assert_allclose(logits, z, rtol=1e-6)
    expected = z[0].max() + z[1, 2] + (0.5 * z[2, 0] + 2.0 * z[2, 2]) + z[3].max()
    assert score.shape == ()
    np.testing.assert_allclose(score, expected, rtol=1e-5)


def test_forward_model_exposes_logits_and_activations():
    augmented = build_forward_model(load_model(tiny_classifier()), ["act"])
    assert augmented.output_names == ["logits", "act"]
    x = np.ones((2, 3, 8, 8), np.float32)
    logits, act = run(augmented.proto, {"input": x}, augmented.output_names)
    assert logits.shape == (2, 3) and act.shape == (2, 4, 8, 8)


def test_unknown_tensor_is_a_clear_error():
    with pytest.raises(OnnxcamError, match="not in the graph"):
        build_forward_model(load_model(tiny_classifier()), ["nope"])


def test_set_outputs_keeps_order_and_drops_repeats():
    model = copy_model(tiny_classifier())
    set_outputs(model, ["act", "logits", "act"])
    assert [o.name for o in model.graph.output] == ["act", "logits"]
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
