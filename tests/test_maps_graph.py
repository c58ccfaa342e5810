"""Final maps computed inside the session (maps_graph.py) against the NumPy engine, the reference:
every gradient method, one and two fused layers, a layer at input resolution, channels-last activations,
a non-integer resize factor, explicit targets, map outputs with a mask, and EfficientNet-Lite0."""
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.maps_graph import IN_GRAPH_METHODS, maps_output
from tiny_models import keras_mobilenet_like, tiny_segmenter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from shapes_data import make_dataset, preprocess  # noqa: E402

SHAPES = ROOT / "models" / "shapes_cnn.onnx"
METHODS = list(IN_GRAPH_METHODS)
# Measured ≤ 6e-7 (float32 reductions in another order, ORT's resize coefficients in float): 10x that.
TOLERANCE = 6e-6


def _pair(model, nodes, **options):
    return (Explainer(model, nodes, provider="cpu", maps="graph", **options),
            Explainer(model, nodes, provider="cpu", maps="numpy", **options))


def _compare(graph, numpy_engine, x, **options):
    ours = graph.explain_many(x, METHODS, **options)
    reference = numpy_engine.explain_many(x, METHODS, **options)
    for method in METHODS:
        a, b = ours[method], reference[method]
        assert a.maps.shape == b.maps.shape and a.maps.dtype == np.float32
        np.testing.assert_allclose(a.maps, b.maps, rtol=0, atol=TOLERANCE, err_msg=method)
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
        for p, q in zip(a.layer_maps, b.layer_maps):
            np.testing.assert_allclose(p, q, rtol=0, atol=TOLERANCE * max(float(np.abs(q).max()), 1e-30))
        assert b.maps.max() > 0.99            # a real map, not the all-zero one
        assert a.maps.min() >= 0 and a.maps.max() <= 1, method
    return ours


@pytest.fixture(scope="module")
def shapes_x():
    return preprocess(make_dataset(5, seed=4)[0])


@pytest.mark.parametrize("nodes", [["/block4/relu/Relu"], ["/block2/relu/Relu", "/block4/relu/Relu"],
                                   ["/block1/relu/Relu"]])     # 64x64: the layer is at input resolution
def test_shapes_cnn(shapes_x, nodes):
    graph, numpy_engine = _pair(SHAPES, nodes)
    _compare(graph, numpy_engine, shapes_x)
    _compare(graph, numpy_engine, shapes_x, targets=[0, 1, 2, 3, 4], batch_size=2)
    names, _ = next(iter(graph._graph_maps.sessions.values()))
    # only the logits, the final maps and the small layer maps leave the session
    assert names[:1 + len(METHODS)] == [graph.logits_name] + [maps_output(m) for m in METHODS]
    assert not set(names) & set(graph.tensors)


def test_channels_last_and_a_non_integer_factor():
    x = np.random.default_rng(2).normal(size=(3, 30, 30, 3)).astype(np.float32)   # NHWC, 30 → 8 → 30
    graph, numpy_engine = _pair(keras_mobilenet_like(nhwc=True, size=30), "out_relu")
    assert graph.nodes[0].shape[-1] == 16          # the activations really are channels-last
    _compare(graph, numpy_engine, x, targets=[0, 3, 5])


def test_map_outputs_with_a_mask():
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    graph, numpy_engine = _pair(tiny_segmenter(), "/enc/Relu")
    mask = np.zeros((8, 8), np.float32)
    mask[2:6, 1:5] = 1
    _compare(graph, numpy_engine, x, targets=[1, 2], target_mask=mask)


def test_other_methods_share_the_run_on_the_host(shapes_x):
    """CAM, EigenCAM and Score-CAM read the activations the same run returns next to the maps."""
    graph, numpy_engine = _pair(SHAPES, "auto")
    methods = ["gradcam", "eigencam", "cam", "layercam", "scorecam"]
    together = graph.explain_many(shapes_x, methods, max_channels=8)
    names, _ = next(iter(graph._graph_maps.sessions.values()))
    assert names[-1] == graph.tensors[0] and len(names) == 1 + 2 * 2 + 1
    for method in methods:
        alone = numpy_engine.explain(shapes_x, method=method, max_channels=8)
        np.testing.assert_allclose(together[method].maps, alone.maps, rtol=0, atol=TOLERANCE, err_msg=method)


def test_efficientnet(efficientnet_onnx, photos):
    graph, numpy_engine = _pair(efficientnet_onnx, "_blocks.15")
    _compare(graph, numpy_engine, photos[:2])


@pytest.mark.parametrize("source, target", [((7, 7), (224, 224)), ((7, 9), (224, 300)), ((30, 20), (7, 9)),
                                            ((5, 5), (5, 5)), ((1, 1), (10, 10)), ((2, 3), (64, 17))])
def test_interpolation_matrices_are_cv2_bilinear(source, target):
    """The constant-MatMul resize (fixed sizes) against cv2.resize INTER_LINEAR, the NumPy engine's:
    up, down, non-integer factors, one pixel, the identity."""
    import cv2
    from onnxcam.methods.interpolation import interpolation_matrix
    maps = np.random.default_rng(0).random(source, np.float32)
    ours = (interpolation_matrix(source[0], target[0], align_corners=False) @ maps
            @ interpolation_matrix(source[1], target[1], align_corners=False).T)
    np.testing.assert_allclose(ours, cv2.resize(maps, target[::-1]), rtol=0, atol=3e-7)


@pytest.mark.parametrize("sources, target", [([(7, 7)], (224, 224)), ([(16, 16), (8, 8)], (64, 64)),
                                             ([(7, 9), (3, 4)], (100, 37)), ([(30, 20)], (7, 9)),
                                             ([(5, 5)], (5, 5)), ([(1, 1), (2, 3)], (10, 10))])
def test_the_min_and_max_of_resized_maps_lie_on_the_extreme_lines(sources, target):
    """The folded normalisation reads the fused maps' min and max on a few output rows and columns
    only: over many random maps, these equal the min and max over every pixel."""
    from onnxcam.maps_graph import _extreme_lines
    from onnxcam.methods.interpolation import interpolation_matrix
    rows = [interpolation_matrix(h, target[0], align_corners=False).astype(np.float64) for h, _ in sources]
    columns = [interpolation_matrix(w, target[1], align_corners=False).astype(np.float64) for _, w in sources]
    keep_rows, keep_columns = _extreme_lines(rows), _extreme_lines(columns)
    if target[0] >= 10 * max(h for h, _ in sources):
        assert len(keep_rows) < target[0] / 4          # a few lines, not all of them (7 -> 224: 16)
    rng = np.random.default_rng(3)
    for _ in range(200):
        fused = np.mean([R @ rng.random(source) @ C.T for R, C, source in zip(rows, columns, sources)], axis=0)
        few = fused[np.ix_(keep_rows, keep_columns)]
        np.testing.assert_allclose([few.min(), few.max()], [fused.min(), fused.max()], rtol=1e-12)


def _with_head(kind: str):
    """tiny_classifier with its Gemm (transB=1) as Gemm transB=0 or MatMul + Add (Keras' form)."""
    import onnx
    from onnx import helper, numpy_helper
    from tiny_models import tiny_classifier
    model = tiny_classifier(channels=6, classes=5, size=8, softmax=False)
    if kind == "gemm":
        return model
    graph = model.graph
    fc = next(i for i in graph.initializer if i.name == "fc_w")
    fc.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(fc).T), "fc_w"))
    node = next(n for n in graph.node if n.op_type == "Gemm")
    if kind == "gemm_transB0":
        node.CopyFrom(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="/fc/Gemm"))
    else:
        index = list(graph.node).index(node)
        del graph.node[index]
        graph.node.insert(index, helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="/fc/MatMul"))
        graph.node.insert(index + 1, helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="/fc/Add"))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("kind", ["gemm", "gemm_transB0", "matmul"])
def test_the_classifier_backward_reads_only_the_target_rows(kind):
    """One-hot target weights times the classifier matrix become a row lookup (gather_target_rows):
    no product with the whole matrix is left in the maps model, and the maps are the NumPy engine's,
    for the arg-max default and for explicit targets."""
    from onnxcam.graph import copy_model
    from onnxcam.layouts import FIRST as graph_layout
    from onnxcam.maps_graph import append_maps
    model = _with_head(kind)
    x = np.random.default_rng(5).normal(size=(4, 3, 8, 8)).astype(np.float32)
    graph, numpy_engine = _pair(model, "/features/relu/Relu")
    _compare(graph, numpy_engine, x)
    _compare(graph, numpy_engine, x, targets=[4, 0, 2, 2])
    gradient = graph.augmented_gradient_model()
    proto = copy_model(gradient.proto)
    append_maps(proto, gradient.input_name, graph.input_layout, gradient.logits, gradient.activations,
                gradient.gradients, [graph_layout], ["gradcam"])
    backward = [n.op_type for n in proto.graph.node if n.name.startswith("onnxcam_bw/")]
    assert "Gather" in backward and not {"Gemm", "MatMul"} & set(backward)


def _small_head(middle, weights, rng, channels: int = 6):
    """input (N, 3, 10, 10) -> Conv 3x3 -> Relu [the node 'act'] -> ``middle`` (act to r2) -> GAP -> Gemm
    (5 classes); ``weights``: the middle's initializers, name -> array."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weights = {"w1": rng.normal(0, 0.5, (6, 3, 3, 3)), **weights, "fc": rng.normal(0, 1.0, (5, channels))}
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in weights.items()]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["act"], name="act"),
             *middle,
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "head",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8        # what onnxruntime 1.17 (the minimum) and onnxruntime-training 1.19 read
    onnx.checker.check_model(model)
    return model


def _conv_head(kernel: int):
    """... -> act -> Conv kernel×kernel, stride 1, padded kernel - 1 -> Relu -> GAP -> Gemm: the backward
    of the second Conv is an unpadded kernel×kernel Conv, which Grad-CAM's mean may go through (1×1) or
    not (3×3)."""
    from onnx import helper
    rng = np.random.default_rng(7)
    middle = [helper.make_node("Conv", ["act", "w2", "b2"], ["c2"], kernel_shape=[kernel, kernel],
                               pads=[kernel - 1] * 4),
              helper.make_node("Relu", ["c2"], ["r2"])]
    return _small_head(middle, {"w2": rng.normal(0, 0.3, (8, 6, kernel, kernel)), "b2": rng.normal(0, 0.1, (8,))},
                       rng, channels=8)


@pytest.mark.parametrize("kernel", [1, 3])
def test_gradcam_mean_goes_through_pointwise_convs_only(kernel):
    """Behind a 1x1 convolution Grad-CAM's spatial mean of the gradient is taken before the backward Conv
    (a per-pixel linear map commutes with the mean); behind a 3x3 one it must not be: both equal the
    NumPy engine, and only the 1x1 model loses its full-size backward Conv and the full-size product of
    the pooled gradient with the ReLU mask (mean(s · mask) = s · mean(mask) for s constant over H, W)."""
    from onnxcam.graph import copy_model
    from onnxcam.layouts import FIRST
    from onnxcam.maps_graph import append_maps
    model = _conv_head(kernel)
    x = np.random.default_rng(8).normal(size=(3, 3, 10, 10)).astype(np.float32)
    graph, numpy_engine = _pair(model, "act")
    _compare(graph, numpy_engine, x)
    gradient = graph.augmented_gradient_model()
    proto = copy_model(gradient.proto)
    append_maps(proto, gradient.input_name, FIRST, gradient.logits, gradient.activations, gradient.gradients,
                [FIRST], ["gradcam"])
    backward = [n for n in proto.graph.node if n.name.startswith("onnxcam_bw/")]
    assert (not [n for n in backward if n.op_type == "Conv"]) == (kernel == 1)
    masks = {n.output[0] for n in backward if n.op_type == "Cast"}
    masked = [n for n in backward if n.op_type == "Mul" and masks & set(n.input)]
    assert len(masks) == 1 and (not masked) == (kernel == 1)


def test_methods_share_their_common_terms():
    """The five methods in one model compute G·A (HiResCAM, XGrad-CAM), relu(G) (LayerCAM, Grad-CAM++)
    and Σ A (XGrad-CAM, Grad-CAM++) once each; the maps stay the reference's (test_shapes_cnn)."""
    from onnxcam.graph import copy_model
    from onnxcam.layouts import FIRST
    from onnxcam.maps_graph import append_maps
    graph = Explainer(_conv_head(3), "act", provider="cpu", maps="graph")
    gradient = graph.augmented_gradient_model()
    proto = copy_model(gradient.proto)
    append_maps(proto, gradient.input_name, FIRST, gradient.logits, gradient.activations, gradient.gradients,
                [FIRST], METHODS)
    A, G = gradient.activations[0], gradient.gradients[0]
    ours = [n for n in proto.graph.node if n.name.startswith("onnxcam_maps/")]
    assert len([n for n in ours if n.op_type == "Mul" and sorted(n.input) == sorted([G, A])]) == 1
    assert len([n for n in ours if n.op_type == "Relu" and list(n.input) == [G]]) == 1
    assert len([n for n in ours if n.op_type == "ReduceSum" and n.input[0] == A]) == 1


def test_gradcam_mean_stays_behind_a_product_that_varies_over_space():
    """input -> Conv 3x3 -> Relu [the node 'act'] -> · P (a constant that varies over H, W) -> Relu -> GAP
    -> Gemm: d score / d act is (pooled gradient · mask) · P, a product of two full-size factors, so the
    mean may only move in front of the pooled gradient's factor: the maps still equal the NumPy engine's."""
    from onnx import helper
    rng = np.random.default_rng(9)
    middle = [helper.make_node("Mul", ["act", "position"], ["weighted"]),
              helper.make_node("Relu", ["weighted"], ["r2"])]
    model = _small_head(middle, {"position": rng.uniform(-1, 2, (1, 6, 10, 10))}, rng)
    x = np.random.default_rng(10).normal(size=(3, 3, 10, 10)).astype(np.float32)
    _compare(*_pair(model, "act"), x)
