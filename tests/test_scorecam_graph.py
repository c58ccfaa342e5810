"""In-graph Score-CAM: the graph's masks and weights equal the NumPy path (methods.scorecam, which shares
softmax, kept_channels and the mask epsilon with it: a consistency check) and, independently, the torch
oracle (tests/torch_oracle.py) on activations with negative values."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import layouts
from onnxcam.methods.scorecam import channel_masks, scorecam_weights
from onnxcam.model import load_model
from onnxcam.runtime import Runner
from onnxcam.scorecam import InGraphScorer, build_scorecam_model, distinct_maps
from onnxcam.surgery import build_forward_model

from tiny_models import tiny_classifier


def _forward(model, layout=layouts.FIRST):
    """Reference pieces: activations (channels-first) and a channels-first forward_logits."""
    forward = build_forward_model(model, ["act"])
    runner = Runner(forward.proto, forward.output_names, "cpu")

    def logits_of(batch_first):
        return runner.run({model.input.name: layouts.to_layout(batch_first.astype(np.float32), layout)})[0]

    return runner, logits_of


def _activations(runner, model, x, layout=layouts.FIRST):
    logits, A = runner.run({model.input.name: x})
    return logits, layouts.to_channels_first(A, layout)


def _with_constant_and_duplicate(A):
    A = A.copy()
    A[0, 1] = 0.25          # constant channel
    A[0, 2] = 0.0           # another constant channel: shares the zero mask
    A[1, 3] = A[1, 0]       # exact duplicate map
    return A


@pytest.fixture
def tiny():
    return load_model(tiny_classifier(channels=6, classes=5, size=8))


def test_weights_equal_numpy_reference(tiny):
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    runner, logits_of = _forward(tiny)
    logits, A = _activations(runner, tiny, x)
    A = _with_constant_and_duplicate(A)
    targets = np.array([0, 4, 2])
    expected = scorecam_weights(A, x, targets, logits_of, batch_size=4)
    scorer = InGraphScorer(tiny, layouts.FIRST, provider="cpu")
    got = scorer.weights(A, x, targets, batch_size=4)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_faster_scorecam_matches_reference(tiny):
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    runner, logits_of = _forward(tiny)
    logits, A = _activations(runner, tiny, x)
    targets = logits.argmax(axis=1)
    expected = scorecam_weights(A, x, targets, logits_of, batch_size=3, max_channels=3)
    got = InGraphScorer(tiny, layouts.FIRST, provider="cpu").weights(A, x, targets, batch_size=3,
                                                                     max_channels=3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert ((got > 0).sum(axis=1) <= 3).all()


def test_chunked_equals_unchunked_and_counts_distinct_masks(tiny):
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    runner, _ = _forward(tiny)
    _, A = _activations(runner, tiny, x)
    A = _with_constant_and_duplicate(A)
    targets = np.array([1, 3])
    seen = []
    one = InGraphScorer(tiny, layouts.FIRST, provider="cpu")
    w_one = one.weights(A, x, targets, batch_size=1, progress=lambda done, total: seen.append((done, total)))
    whole = InGraphScorer(tiny, layouts.FIRST, provider="cpu")
    w_whole = whole.weights(A, x, targets, batch_size=64)
    np.testing.assert_array_equal(w_one, w_whole)
    # sample 0: 6 channels, two constant -> 4 varying + 1 zero mask; sample 1: one duplicate -> 5
    varying_1 = len({A[1, k].tobytes() for k in range(6)})
    assert varying_1 == 5
    assert one.masks_scored == whole.masks_scored == 5 + 5
    assert seen[-1] == (10, 10) and len(seen) == 10


def test_distinct_maps_slots():
    A = np.stack([np.full((2, 2), 3.0), np.eye(2), np.eye(2), np.zeros((2, 2))]).astype(np.float32)
    maps, slot = distinct_maps(A, None)
    assert maps.shape == (2, 2, 2)
    np.testing.assert_array_equal(slot, [0, 1, 1, 0])
    np.testing.assert_array_equal(maps[0], 0)          # constant channels share the all-zero map
    maps, slot = distinct_maps(A, 1)                   # Faster Score-CAM: one channel kept
    assert len(maps) == 1 and (slot >= 0).sum() == 1


def _mask_probe(spatial: tuple, layout: str) -> onnx.ModelProto:
    """A 'model' whose logits are its (one-channel) input flattened: it returns the masks themselves."""
    dims = ["N", 1, *spatial] if layout == layouts.FIRST else ["N", *spatial, 1]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"], axis=1)], "probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", int(np.prod(spatial))])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("small, size", [((7,), (50,)), ((7, 7), (64, 64)), ((3, 5, 4), (6, 11, 9)),
                                          ((5, 6), (5, 6))])
@pytest.mark.parametrize("layout", [layouts.FIRST, layouts.LAST])
def test_graph_masks_equal_channel_masks(small, size, layout):
    model = load_model(_mask_probe(size, layout))
    proto = build_scorecam_model(model, layout)
    onnx.checker.check_model(proto, full_check=True)
    runner = Runner(proto, [proto.graph.output[0].name], "cpu")
    rng = np.random.default_rng(4)
    maps = (rng.normal(size=(6, *small)) * rng.uniform(0.01, 50, size=(6,) + (1,) * len(small)))
    maps = np.maximum(maps, 0).astype(np.float32)
    ones = np.ones((1, 1, *size) if layout == layouts.FIRST else (1, *size, 1), np.float32)
    feeds = {"onnxcam_x": ones, "onnxcam_maps": maps}
    if len(small) == 2:       # 2D: the upsampling is two MatMuls with matrices the scorer feeds
        from onnxcam.methods.interpolation import interpolation_matrix
        assert {i.name for i in proto.graph.input} >= {"onnxcam_rows", "onnxcam_columns"}
        feeds.update(onnxcam_rows=interpolation_matrix(small[0], size[0], align_corners=True),
                     onnxcam_columns=interpolation_matrix(small[1], size[1], align_corners=True).T.copy())
    got = runner.run(feeds)[0].reshape(6, *size)
    np.testing.assert_allclose(got, channel_masks(maps, size), atol=1e-6, rtol=0)


def _channels_last_classifier(channels=5, classes=4, size=8, seed=0) -> onnx.ModelProto:
    """A TensorFlow-style graph: NHWC input, NHWC activations 'act', ReduceMean pooling, MatMul head."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (rng.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32), "conv_w"),
        (rng.normal(0, 0.1, (channels,)).astype(np.float32), "conv_b"),
        (rng.normal(0, 1.0, (channels, classes)).astype(np.float32), "fc_w"),
        (np.array([1, 2], dtype=np.int64), "hw_axes"))]
    nodes = [
        helper.make_node("Transpose", ["input"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["conv"], ["conv_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["conv_nhwc"], ["act"]),
        helper.make_node("ReduceMean", ["act", "hw_axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "fc_w"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", size, size, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_channels_last_graph_equals_reference():
    model = load_model(_channels_last_classifier())
    x = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype(np.float32)
    runner, logits_of = _forward(model, layouts.LAST)
    logits, A = _activations(runner, model, x, layouts.LAST)
    targets = logits.argmax(axis=1)
    expected = scorecam_weights(A, layouts.to_channels_first(x, layouts.LAST), targets, logits_of,
                                batch_size=3)
    got = InGraphScorer(model, layouts.LAST, provider="cpu").weights(A, x, targets, batch_size=3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_fixed_batch_model_pads_chunks():
    model = load_model(tiny_classifier(channels=5, classes=3, size=8, batch=2))
    x = np.random.default_rng(6).normal(size=(2, 3, 8, 8)).astype(np.float32)
    runner, logits_of = _forward(model)
    logits, A = _activations(runner, model, x)
    targets = logits.argmax(axis=1)
    expected = scorecam_weights(A, x, targets, logits_of, batch_size=2)
    got = InGraphScorer(model, layouts.FIRST, provider="cpu").weights(A, x, targets, batch_size=32)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_old_opset_is_refused_with_a_clear_error(tiny):
    from onnxcam.errors import OnnxcamError
    proto = tiny_classifier()
    proto.opset_import[0].version = 10
    with pytest.raises(OnnxcamError, match="opset 11"):
        build_scorecam_model(load_model(proto), layouts.FIRST)


# ---- against the torch oracle (torch interpolation, torch forward passes, torch softmax), which shares
# no code with onnxcam; activations with negative values and a non-zero minimum, so a mask that skips
# the min-subtraction or the normalisation shows


def _signed_activations(rng, n, c, spatial):
    A = rng.normal(size=(n, c, *spatial)) * rng.uniform(0.1, 5, size=(n, c) + (1,) * len(spatial)) - 2.0
    A = A.astype(np.float32)
    A[0, 1] = -0.75            # a constant negative channel: the all-zero mask
    A[1, 3] = A[1, 0]          # an exact duplicate
    return A


@pytest.mark.parametrize("spatial", [(8, 8), (3, 5)], ids=["same-size", "upsampled"])
@pytest.mark.parametrize("max_channels", [None, 4])
def test_weights_equal_torch_oracle_on_signed_activations(spatial, max_channels):
    torch_oracle = pytest.importorskip("torch_oracle")
    proto = tiny_classifier(channels=6, classes=5, size=8)
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    A = _signed_activations(rng, 2, 6, spatial)
    targets = np.array([3, 1])
    got = InGraphScorer(load_model(proto), layouts.FIRST, provider="cpu").weights(
        A, x, targets, batch_size=4, max_channels=max_channels)
    net = torch_oracle.tiny_classifier_torch(proto)
    if max_channels is None:
        expected = torch_oracle.scorecam_weights(net, A, x, targets)
    else:   # Faster Score-CAM = Score-CAM on the kept (highest spatial variance) channels alone
        expected = np.zeros_like(got)
        for n in range(2):
            kept = np.sort(np.argsort(-A[n].reshape(6, -1).var(axis=1))[:max_channels])
            expected[n, kept] = torch_oracle.scorecam_weights(net, A[n:n + 1, kept], x[n:n + 1], targets[n:n + 1])[0]
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
