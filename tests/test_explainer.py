"""The Python API end to end on a tiny hand-built classifier whose Grad-CAM is known exactly."""
import numpy as np
import pytest

import onnxcam
from onnxcam import Explainer, OnnxcamError
from onnxcam.gradients import ort_training_available
from onnxcam.methods.postprocess import fuse_layers, layer_to_input
from tiny_models import fc_weights, reference_gradcam_layer_map, tiny_classifier


@pytest.fixture(scope="module")
def model():
    return tiny_classifier(channels=4, classes=3, size=8)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(3).normal(size=(5, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module", params=["portable", "ort-training"])
def explainer(model, request):
    if request.param == "ort-training" and not ort_training_available():
        pytest.skip("needs onnxruntime-training")
    return Explainer(model, "/features/relu/Relu", grad_backend=request.param)


def expected_maps(explainer, model, x, targets):
    activations = explainer.forward(x)[1]
    layer = reference_gradcam_layer_map(activations, fc_weights(model), targets)
    return fuse_layers([layer_to_input(layer, (8, 8))])


def test_gradcam_equals_the_closed_form(explainer, model, x):
    result = explainer.explain(x)
    logits = explainer.forward(x)[0]
    np.testing.assert_array_equal(result.targets, logits.argmax(1))
    np.testing.assert_allclose(result.scores, logits.max(1), rtol=1e-6)
    assert result.maps.shape == (5, 8, 8) and result.maps.dtype == np.float32
    np.testing.assert_allclose(result.maps, expected_maps(explainer, model, x, result.targets), atol=1e-5)
    assert result.maps.min() >= 0 and result.maps.max() <= 1


def test_explicit_targets_mixed_per_sample(explainer, model, x):
    targets = [0, 1, 2, 1, 0]
    result = explainer.explain(x, targets=targets)
    np.testing.assert_array_equal(result.targets, targets)
    np.testing.assert_allclose(result.maps, expected_maps(explainer, model, x, targets), atol=1e-5)


def test_batching_does_not_change_maps(explainer, x):
    whole = explainer.explain(x, targets=1).maps
    chunked = explainer.explain(x, targets=1, batch_size=2).maps
    np.testing.assert_allclose(whole, chunked, atol=1e-6)


def test_cam_matches_gradcam_for_gap_linear_head(explainer, x):
    """Theory: with GAP -> linear, Grad-CAM weights are the FC row / (H W): same normalised map."""
    np.testing.assert_allclose(explainer.explain(x, "cam").maps, explainer.explain(x, "gradcam").maps,
                               atol=1e-5)


def test_every_method_runs_and_stays_in_unit_range(explainer, x):
    for method in onnxcam.METHODS:
        if method == "legrad":      # vision transformers only: tests/test_legrad.py
            continue
        maps = explainer.explain(x[:2], method=method, targets=[0, 2]).maps
        assert maps.shape == (2, 8, 8), method
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6, method


def test_explain_function_shortcut(model, x):
    maps = onnxcam.explain(model, x[:1], node="auto", method="gradcam")
    assert maps.shape == (1, 8, 8)


def test_target_out_of_range(explainer, x):
    with pytest.raises(OnnxcamError, match="out of range: the model has 3 classes"):
        explainer.explain(x, targets=3)


def test_wrong_input_size(explainer):
    with pytest.raises(OnnxcamError, match="resize the input"):
        explainer.explain(np.zeros((1, 3, 9, 9), np.float32))


def test_unknown_method(explainer, x):
    with pytest.raises(OnnxcamError, match="unknown CAM method"):
        explainer.explain(x, method="gradcam+++")


def test_non_spatial_node_is_refused(model):
    with pytest.raises(OnnxcamError, match="no spatial axes"):
        Explainer(model, "/fc/Gemm")


def test_second_explainer_reads_the_augmented_model_from_the_cache(model, x, tmp_path, monkeypatch):
    import onnxcam.gradient_models as gradient_models_module
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path))
    import onnxcam.derived as derived_module
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path))
    first = Explainer(model, "/features/relu/Relu", grad_backend="portable", maps="numpy").explain(x).maps
    # the augmented model and the node table (shapes inference + probe), both keyed by the model bytes
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".onnxcam"]
    fresh = Explainer(model, "/features/relu/Relu", cache=False).candidates

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the augmented model was built again")

    def no_node_table(*args, **kwargs):
        raise AssertionError("the node table was computed again")

    monkeypatch.setattr(gradient_models_module, "build_gradient_augmented_model", no_rebuild)
    monkeypatch.setattr(derived_module, "list_candidates", no_node_table)
    again = Explainer(model, "/features/relu/Relu", grad_backend="portable", maps="numpy")
    assert again.candidates == fresh
    np.testing.assert_array_equal(again.explain(x).maps, first)
    assert again.gradient_backend_used == "portable"
    with pytest.raises(AssertionError, match="built again"):
        Explainer(model, "/features/conv/Conv", grad_backend="portable").explain(x)


def test_warm_explainer_with_in_graph_maps_reads_nothing_but_the_maps_model(model, x, tmp_path, monkeypatch):
    """A warm call (the CLI's fixed cost) neither parses the gradient model nor runs shape inference:
    the in-graph maps model, the node table, the scored output's shape and the gradient backend are
    all read back from the cache."""
    import onnx.shape_inference
    import onnxcam.gradient_models as gradient_models_module
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    first = Explainer(path, "/features/relu/Relu", grad_backend="portable", maps="graph").explain(x).maps

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed on a warm cache")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", forbidden)
    monkeypatch.setattr(gradient_models_module.GradientModels, "_built", forbidden)
    again = Explainer(path, "/features/relu/Relu", grad_backend="portable", maps="graph")
    np.testing.assert_array_equal(again.explain(x).maps, first)
    assert again.gradient_backend_used == "portable"


def test_missing_onnxruntime_names_the_extras(model, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxcamError, match=r"onnxcam\[cpu\]"):
        Explainer(model, "/features/relu/Relu", cache=False).forward(np.zeros((1, 3, 8, 8), np.float32))


def test_cam_refused_without_a_gap_linear_head(model, x):
    explainer = Explainer(model, "/features/conv/Conv")
    with pytest.raises(OnnxcamError, match="use --method gradcam"):
        explainer.explain(x, method="cam")


def test_gradient_method_without_any_backend_names_the_op(x):
    from tiny_models import with_unruled_op
    if ort_training_available():
        pytest.skip("onnxruntime-training differentiates Einsum")
    explainer = Explainer(with_unruled_op(tiny_classifier()), "/features/conv/Conv", cache=False)
    with pytest.raises(OnnxcamError, match="Einsum"):
        explainer.explain(x)
    assert explainer.explain(x, method="eigencam").maps.shape == (5, 8, 8)   # gradient-free still works


def test_scorecam_refused_when_node_axes_do_not_match_the_input(x):
    from tiny_models import flattened_node_classifier
    explainer = Explainer(flattened_node_classifier(), "/features/reshape")
    assert explainer.nodes[0].shape == (None, 4, 64)
    with pytest.raises(OnnxcamError, match="spatial axes"):
        explainer.explain(x, method="scorecam")
