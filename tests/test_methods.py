"""Layer-map formulas: hand-computed values on a 1×2×2×2 example, then loop references on random arrays
of every spatial rank, the registry, and EigenCAM against the full-SVD recipe of pytorch-grad-cam."""
import dataclasses
import importlib
import itertools

import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.methods import (ATTENTION_GRADIENTS, CHANNEL_SCORES, CLASS_WEIGHTS, GRADIENTS, METHODS, cam, eigencam,
                             get_method, gradcam, gradcam_plus_plus, hirescam, layercam, weighted_sum, xgradcam)
from onnxcam.methods.eigencam import first_component_projection

# channel 0 sums to 10, channel 1 to 2
A = np.array([[[[1, 2], [3, 4]], [[0, 1], [1, 0]]]], dtype=np.float32)
G = np.array([[[[1, 0], [1, 1]], [[-1, 2], [-1, -1]]]], dtype=np.float32)


def test_gradcam_by_hand():
    # w = (0.75, -0.25)
    np.testing.assert_allclose(gradcam(A, G)[0], [[0.75, 1.25], [2.0, 3.0]], rtol=1e-6)


def test_gradcam_plus_plus_by_hand():
    # channel 0: a = 1 / (2 + 10) where G = 1 → w0 = 3/12; channel 1: only G = 2 counts,
    # a = 4 / (8 + 2·8) = 1/6 → w1 = 2/6
    expected = 0.25 * A[0, 0] + (1 / 3) * A[0, 1]
    np.testing.assert_allclose(gradcam_plus_plus(A, G)[0], expected, rtol=1e-5)


def test_xgradcam_by_hand():
    # w0 = (1 + 3 + 4) / 10 = 0.8, w1 = (2 - 1) / 2 = 0.5
    np.testing.assert_allclose(xgradcam(A, G)[0], [[0.8, 2.1], [2.9, 3.2]], rtol=1e-5)


def test_hirescam_by_hand():
    # G·A summed over channels; at (1, 0): 1·3 + (-1)·1 = 2
    np.testing.assert_allclose(hirescam(A, G)[0], [[1, 2], [2, 4]], rtol=1e-6)


def test_layercam_by_hand():
    np.testing.assert_allclose(layercam(A, G)[0], [[1, 2], [3, 4]], rtol=1e-6)


def test_hirescam_and_layercam_clip_negative_sums():
    np.testing.assert_array_equal(hirescam(A, -G)[0], [[0, 0], [0, 0]])
    np.testing.assert_array_equal(layercam(A, np.full_like(G, -1)), np.zeros((1, 2, 2)))


def test_cam_by_hand_and_relu():
    np.testing.assert_allclose(cam(A, np.array([[1, -2]]))[0], [[1, 0], [1, 4]], rtol=1e-6)
    np.testing.assert_array_equal(cam(A, np.array([[-1, 1]]))[0], np.zeros((2, 2)))


def test_gradcam_plus_plus_ignores_zero_gradients_without_nan():
    out = gradcam_plus_plus(A, np.zeros_like(G))
    assert np.isfinite(out).all() and not out.any()


# ----- loop references on random arrays (1D, 2D, 3D) -----

def _positions(shape):
    return list(itertools.product(*(range(s) for s in shape)))


def _loop_map(A, weight_fn):
    """Σ_C w[n, c] · A[n, c, s] with w from ``weight_fn(n, c)``, then relu, by plain loops in float64."""
    N, C, *S = A.shape
    out = np.zeros([N] + S)
    for n in range(N):
        for c in range(C):
            w = weight_fn(n, c)
            for s in _positions(S):
                out[(n,) + s] += w * float(A[(n, c) + s])
    return np.maximum(out, 0)


def _loop_channel_sum(A, G, n, c, term):
    return sum(term(float(A[(n, c) + s]), float(G[(n, c) + s])) for s in _positions(A.shape[2:]))


def _loop_gradcam_pp_weight(A, G, n, c):
    total_a = _loop_channel_sum(A, G, n, c, lambda a, g: a)
    weight = 0.0
    for s in _positions(A.shape[2:]):
        g = float(G[(n, c) + s])
        if g != 0:
            weight += max(g, 0) * g * g / (2 * g * g + total_a * g ** 3 + 1e-6)
    return weight


@pytest.fixture(params=[(2, 3, 5), (2, 3, 4, 3), (1, 4, 2, 3, 2)], ids=["1d", "2d", "3d"])
def random_pair(request):
    rng = np.random.default_rng(sum(request.param))
    A = np.maximum(rng.standard_normal(request.param), 0).astype(np.float32) + 0.1
    G = rng.standard_normal(request.param).astype(np.float32)
    return A, G


def test_gradient_methods_match_loop_references(random_pair):
    A, G = random_pair
    count = np.prod(A.shape[2:])
    references = {
        gradcam: _loop_map(A, lambda n, c: _loop_channel_sum(A, G, n, c, lambda a, g: g) / count),
        xgradcam: _loop_map(A, lambda n, c: _loop_channel_sum(A, G, n, c, lambda a, g: a * g)
                            / (_loop_channel_sum(A, G, n, c, lambda a, g: a) + 1e-7)),
        gradcam_plus_plus: _loop_map(A, lambda n, c: _loop_gradcam_pp_weight(A, G, n, c)),
        hirescam: np.maximum((A.astype(np.float64) * G).sum(axis=1), 0),
        layercam: np.maximum((A.astype(np.float64) * np.maximum(G, 0)).sum(axis=1), 0),
    }
    for method, expected in references.items():
        got = method(A, G)
        assert got.dtype == np.float32 and got.shape == A.shape[:1] + A.shape[2:]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=method.__name__)


def test_cam_and_weighted_sum_match_loop_reference(random_pair):
    A, _ = random_pair
    w = np.random.default_rng(1).standard_normal(A.shape[:2]).astype(np.float32)
    expected = _loop_map(A, lambda n, c: float(w[n, c]))
    np.testing.assert_allclose(cam(A, w), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weighted_sum(A, w), expected, rtol=1e-4, atol=1e-5)


# ----- EigenCAM -----

def test_eigencam_projects_on_the_dominant_direction():
    # one channel varies (a single bright position), the other is constant: centred rows are
    # (0.75, 0), (-0.25, 0) × 3, so the projection is ±(0.75, -0.25, -0.25, -0.25)
    sample = np.array([[[1, 0], [0, 0]], [[5, 5], [5, 5]]], dtype=np.float32)
    projection = first_component_projection(sample)
    np.testing.assert_allclose(np.abs(projection), [[0.75, 0.25], [0.25, 0.25]], rtol=1e-5)
    np.testing.assert_allclose(eigencam(sample[None])[0], np.maximum(projection, 0), rtol=1e-6)


def _reference_projection(a):
    """pytorch-grad-cam's get_2d_projection recipe for one sample, full SVD always."""
    rows = np.where(np.isnan(a), 0, a).reshape(a.shape[0], -1).T
    rows = rows - rows.mean(axis=0)
    vt = np.linalg.svd(rows, full_matrices=True)[2]
    return (rows @ vt[0, :]).reshape(a.shape[1:])


@pytest.mark.parametrize("shape", [(2, 8, 7), (2, 16, 5, 6), (1, 3, 2, 3, 4), (1, 64, 3, 3)])
def test_eigencam_matches_full_svd_recipe(shape):
    A = np.random.default_rng(3).random(shape, dtype=np.float32)
    A[0, 0, 0] = np.nan  # NaNs are read as 0, like pytorch-grad-cam
    expected = np.maximum(np.stack([_reference_projection(a) for a in A]), 0)
    np.testing.assert_allclose(eigencam(A), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions, channels", [(49, 256), (196, 64), (64, 64), (300, 40), (9, 512)])
def test_economy_svd_gives_the_full_svd_projection_bit_for_bit(positions, channels):
    a = np.random.default_rng(positions).random((channels, 1, positions), dtype=np.float32)
    np.testing.assert_array_equal(first_component_projection(a), _reference_projection(a))


def test_eigencam_spreads_samples_over_threads_bit_for_bit(monkeypatch):
    """Each sample's SVD on a worker thread gives the serial maps exactly, in sample order; ``threads=1``
    starts no thread, and ``threads=None`` uses every CPU the process may use."""
    module = importlib.import_module("onnxcam.methods.eigencam")   # (onnxcam.methods.eigencam is the function)
    from concurrent.futures import ThreadPoolExecutor
    A = np.random.default_rng(11).standard_normal((6, 40, 7, 7)).astype(np.float32)
    pools = []

    class Recording(ThreadPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(module, "ThreadPoolExecutor", Recording)
    serial = eigencam(A, threads=1)
    assert pools == []
    np.testing.assert_array_equal(eigencam(A, threads=4), serial)
    assert pools == [4]
    monkeypatch.setattr(module, "available_cpus", lambda: 3)
    np.testing.assert_array_equal(eigencam(A), serial)
    np.testing.assert_array_equal(eigencam(A[:2]), serial[:2])
    assert pools == [4, 3, 2]
    expected = np.maximum(np.stack([first_component_projection(a) for a in A]), 0)
    np.testing.assert_array_equal(serial, expected)


def test_explainer_threads_bound_the_eigencam_threads(monkeypatch):
    """Explainer(threads=N) (the CLI's $ONNXCAM_THREADS too) caps the host threads as it caps ONNX Runtime's."""
    module = importlib.import_module("onnxcam.methods.eigencam")   # (onnxcam.methods.eigencam is the function)
    from onnxcam import Explainer
    from tiny_models import tiny_classifier
    seen = []
    real = module.eigencam
    monkeypatch.setitem(METHODS, "eigencam", dataclasses.replace(
        METHODS["eigencam"], function=lambda A, threads=None: seen.append(threads) or real(A, threads=threads)))
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    Explainer(tiny_classifier(size=8), "/features/relu/Relu", provider="cpu", threads=1, cache=False).explain(
        x, method="eigencam")
    monkeypatch.setenv("ONNXCAM_THREADS", "2")
    Explainer(tiny_classifier(size=8), "/features/relu/Relu", provider="cpu", cache=False).explain(
        x, method="eigencam")
    assert seen == [1, 2]


def test_eigencam_needs_spatial_axes():
    with pytest.raises(OnnxcamError, match="spatial"):
        eigencam(np.zeros((2, 3), dtype=np.float32))


# ----- registry -----

def test_registry_lists_every_method_in_order_with_its_needs():
    assert list(METHODS) == ["cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam",
                             "scorecam", "legrad"]
    assert METHODS["legrad"].needs == (ATTENTION_GRADIENTS,) and METHODS["legrad"].fuse_raw
    assert not any(m.fuse_raw for name, m in METHODS.items() if name != "legrad")
    assert [m.name for m in METHODS.values() if m.needs == (GRADIENTS,)] == [
        "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
    assert METHODS["cam"].needs == (CLASS_WEIGHTS,) and METHODS["scorecam"].needs == (CHANNEL_SCORES,)
    assert METHODS["eigencam"].needs == ()
    assert not METHODS["eigencam"].needs_target
    assert all(m.needs_target for name, m in METHODS.items() if name != "eigencam")
    assert all(m.paper and m.description for m in METHODS.values())
    assert get_method("GradCAM++").function is gradcam_plus_plus
    assert get_method("scorecam").function is weighted_sum


def test_unknown_method_lists_valid_names():
    with pytest.raises(OnnxcamError, match="gradcam, gradcam\\+\\+"):
        get_method("gradcam3")
