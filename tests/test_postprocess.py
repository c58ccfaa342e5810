"""Normalisation, resizing (1D / 2D / 3D) and layer fusion, against hand values, OpenCV and PyTorch."""
import cv2
import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.methods.interpolation import linear_resize
from onnxcam.methods.postprocess import fuse_layers, layer_to_input, normalize, resize


def torch_interpolate(array, size, mode, align_corners):
    """torch.nn.functional.interpolate as the reference (skipped where torch is not installed)."""
    torch = pytest.importorskip("torch")
    return torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(array)), size=size, mode=mode,
                                           align_corners=align_corners).numpy()


def test_normalize_by_hand():
    out = normalize(np.array([[[0, 1], [2, 3]], [[-1, -1], [1, 3]]], dtype=np.float32))
    np.testing.assert_allclose(out[0], [[0, 1 / 3], [2 / 3, 1]], rtol=1e-6)
    np.testing.assert_allclose(out[1], [[0, 0], [0.5, 1]], rtol=1e-6)


def test_zero_and_constant_maps_stay_zero():
    maps = np.stack([np.zeros((3, 4)), np.full((3, 4), 7.0)]).astype(np.float32)
    for out in (normalize(maps), layer_to_input(maps, (6, 8)), fuse_layers([maps, maps])):
        assert np.isfinite(out).all() and not out.any()


def test_linear_half_pixel_by_hand():
    # half-pixel sources for 2 → 4: -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the last sample)
    np.testing.assert_allclose(resize(np.array([[0, 1]], dtype=np.float32), (4,))[0], [0, 0.25, 0.75, 1])


def test_2d_resize_is_cv2_resize_default():
    maps = np.random.default_rng(0).random((2, 5, 7), dtype=np.float32)
    out = resize(maps, (11, 3))   # (height, width), array order
    assert out.shape == (2, 11, 3)
    for m, o in zip(maps, out):
        np.testing.assert_array_equal(o, cv2.resize(m, (3, 11)))


@pytest.mark.parametrize("src, dst", [((5, 7), (11, 3)), ((7, 7), (224, 224)), ((6, 4), (3, 2))])
def test_numpy_bilinear_matches_cv2_and_torch(src, dst):
    maps = np.random.default_rng(1).random((2,) + src, dtype=np.float32)
    ours = linear_resize(maps, dst, align_corners=False)
    ref_torch = torch_interpolate(maps[:, None], dst, "bilinear", False)[:, 0]
    np.testing.assert_allclose(ours, ref_torch, atol=1e-6)
    np.testing.assert_allclose(ours, resize(maps, dst), atol=1e-6)


@pytest.mark.parametrize("src, dst", [((5,), (13,)), ((9,), (4,)), ((3,), (3,))])
def test_1d_resize_matches_torch_linear(src, dst):
    maps = np.random.default_rng(2).random((3,) + src, dtype=np.float32)
    ref = torch_interpolate(maps[:, None], dst, "linear", False)[:, 0]
    np.testing.assert_allclose(resize(maps, dst), ref, atol=1e-6)


@pytest.mark.parametrize("src, dst", [((2, 3, 4), (5, 7, 9)), ((4, 4, 4), (2, 3, 8))])
def test_3d_resize_matches_torch_trilinear(src, dst):
    maps = np.random.default_rng(3).random((2,) + src, dtype=np.float32)
    ref = torch_interpolate(maps[:, None], dst, "trilinear", False)[:, 0]
    np.testing.assert_allclose(resize(maps, dst), ref, atol=1e-6)


def test_resize_rejects_a_different_spatial_rank():
    with pytest.raises(OnnxcamError, match="spatial axes"):
        resize(np.zeros((1, 4, 4), dtype=np.float32), (8, 8, 8))


def _scale_cam_image(cam, size_hw):
    """pytorch-grad-cam's scale_cam_image for 2D maps, written out: normalise each, then cv2.resize."""
    out = []
    for img in cam:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        out.append(cv2.resize(np.float32(img), size_hw[::-1]))
    return np.float32(out)


def test_layer_to_input_and_fusion_follow_pytorch_grad_cam():
    rng = np.random.default_rng(4)
    layers = [rng.standard_normal((2, 4, 4)).astype(np.float32), rng.standard_normal((2, 2, 3)).astype(np.float32)]
    per_layer = [layer_to_input(m, (8, 10)) for m in layers]
    for m, got in zip(layers, per_layer):
        np.testing.assert_allclose(got, _scale_cam_image(np.maximum(m, 0), (8, 10)), atol=1e-6)
    expected = _scale_cam_image(np.maximum(np.stack(per_layer, axis=1), 0).mean(axis=1), (8, 10))
    fused = fuse_layers(per_layer)
    assert fused.dtype == np.float32 and fused.shape == (2, 8, 10)
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    assert fused.min() >= 0 and fused.max() <= 1


def test_fusion_by_hand_1d():
    a = np.array([[0, 0.5, 1]], dtype=np.float32)
    b = np.array([[1, 0, 0]], dtype=np.float32)
    # mean = (0.5, 0.25, 0.5) → minus 0.25, divided by 0.25
    np.testing.assert_allclose(fuse_layers([a, b])[0], [1, 0, 1], rtol=1e-5)


def test_one_layer_fusion_renormalises_the_resized_layer():
    # resizing moves the extremes off the sample grid, so fusion stretches the map back to [0, 1]
    m = layer_to_input(np.random.default_rng(5).random((1, 3, 3, 3), dtype=np.float32), (6, 6, 6))
    assert m.shape == (1, 6, 6, 6) and m.min() > 0
    fused = fuse_layers([m])
    np.testing.assert_allclose(fused, (m - m.min()) / (m.max() - m.min() + 1e-7), atol=1e-6)
    assert fused.min() == 0 and abs(fused.max() - 1) < 1e-6
