"""Images in and pictures out, against references written in the test (tests/user_path.py): every
preprocessing flag pixel by pixel, the CLI's flags end to end, read_image on 8/16-bit, grayscale and
RGBA files, and overlays that are hot where the map is high, at the photo's own size."""
from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest

from onnxcam import OnnxcamError
from onnxcam.preprocess import Preprocessing, read_image
from onnxcam.render import grid, jet_heatmap, label_panel, overlay, render_map
from user_path import (JET_HIGH_RGB, JET_LOW_RGB, bilinear_resize, channel_mean_model, is_cold, is_hot,
                       reference_jet, reference_overlay, reference_preprocess, run_cli)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def rgb():
    """Random pixels with a different range per channel (R dark, G mid, B bright): a swapped channel
    order or a wrong per-channel constant shows in every statistic."""
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(lo, lo + 86, (23, 37)) for lo in (0, 85, 170)], axis=-1).astype(np.uint8)


def level(scale, std):
    """One grey level after scaling and dividing by std: OpenCV rounds resized uint8 pixels."""
    return scale / min(std) + 1e-5


# ------------------------------------------------------------------ Preprocessing.apply, by flag


@pytest.mark.parametrize("size", [None, (11, 18), (46, 74), (30, 20)], ids=["keep", "down", "up", "aspect"])
@pytest.mark.parametrize("color", ["RGB", "BGR"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_apply_equals_the_formula(rgb, size, color, layout):
    p = Preprocessing(size=size, mean=MEAN, std=STD, scale=1 / 255, color=color, layout=layout)
    got = p.apply(rgb)
    want = reference_preprocess(rgb, size, MEAN, STD, 1 / 255, color, layout)
    assert got.dtype == np.float32 and got.shape == want.shape
    tol = level(1 / 255, STD) if size is not None else 1e-5    # no resize: exact up to float32
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def test_scale_mean_std_each_matter(rgb):
    """Hand example on one pixel: x = (v * scale - mean) / std per channel."""
    pixel = np.array([[[10, 200, 255]]], np.uint8)
    x = Preprocessing(mean=(1.0, 2.0, 3.0), std=(0.5, 4.0, 10.0), scale=0.1).apply(pixel)
    np.testing.assert_allclose(x[:, 0, 0], [(1.0 - 1) / 0.5, (20.0 - 2) / 4.0, (25.5 - 3) / 10.0], rtol=1e-6)
    x = Preprocessing(mean=(1.0, 2.0, 3.0), std=(0.5, 4.0, 10.0), scale=0.1, color="BGR",
                      layout="NHWC").apply(pixel)
    np.testing.assert_allclose(x[0, 0], [(25.5 - 1) / 0.5, (20.0 - 2) / 4.0, (1.0 - 3) / 10.0], rtol=1e-6)


def test_metadata_preset_and_input_shape_defaults():
    meta = {"size": [6, 10], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "scale": 0.5, "color": "bgr",
            "layout": "nhwc"}
    p = Preprocessing.from_metadata(meta, ("N", 3, 224, 224))
    assert p == Preprocessing(size=(6, 10), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), scale=0.5,
                              color="BGR", layout="NHWC")
    assert Preprocessing.from_metadata({"size": 8}, None).size == (8, 8)
    # no metadata: the layout and static size come from the input shape
    assert Preprocessing.from_metadata(None, ("N", 12, 20, 3)) == Preprocessing(size=(12, 20), layout="NHWC")
    assert Preprocessing.from_metadata(None, ("N", 3, "H", "W")) == Preprocessing()


@pytest.mark.parametrize("fields, message", [
    ({"layout": "NCWH"}, "unknown layout 'NCWH'; use NCHW or NHWC"),
    ({"color": "HSV"}, "unknown colour order 'HSV'; use RGB or BGR"),
    ({"mean": (0.5,), "std": (1.0, 1.0)}, "--mean has 1 values but --std has 2; give one value per channel to both"),
    ({"std": (1.0, 0.0, 1.0)}, "--std contains 0; every standard deviation must be non-zero"),
    ({"size": (0, 4)}, "--size (0, 4) must be positive"),
])
def test_invalid_preprocessing_is_refused(fields, message):
    with pytest.raises(OnnxcamError) as info:
        Preprocessing(**fields).validated()
    assert str(info.value) == message


# ------------------------------------------------------------------ the CLI's flags reach the model


def _channel_means(tmp_path, rgb, layout, *flags):
    """Run `onnxcam explain --top-k 3 --json` on the channel-mean model: class k's score is the mean
    of preprocessed channel k."""
    model = tmp_path / f"means_{layout}.onnx"
    onnx.save(channel_mean_model(6, 10, layout), str(model))
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), rgb[..., ::-1])
    result = run_cli("explain", model, image, "--top-k", "3", "--json", "--out", tmp_path / "o",
                     "--overwrite", *flags)
    assert result.exit_code == 0, result.stderr
    entries = json.loads(result.stdout)["results"]
    scores = {e["class"]: e["score"] for e in entries}
    return np.array([scores[k] for k in range(3)])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("bgr", [False, True], ids=["rgb", "bgr"])
def test_cli_flags_reach_the_model(tmp_path, rgb, layout, bgr):
    flags = ["--size", "6,10", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--scale", "0.0039",
             "--layout", layout] + (["--bgr"] if bgr else [])
    got = _channel_means(tmp_path, rgb, layout, *flags)
    x = reference_preprocess(rgb, (6, 10), MEAN, STD, 0.0039, "BGR" if bgr else "RGB", "NHWC")
    want = x.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(got, want, atol=level(0.0039, STD), rtol=0)   # OpenCV rounds to uint8


def test_cli_defaults_come_from_the_metadata_preset(tmp_path, rgb):
    meta = {"size": [6, 10], "mean": [0.2, 0.3, 0.4], "std": [0.1, 0.2, 0.3], "scale": 0.002, "color": "BGR",
            "layout": "NCHW"}
    model = tmp_path / "meta.onnx"
    onnx.save(channel_mean_model(6, 10, "NCHW", metadata=meta), str(model))
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), rgb[..., ::-1])
    result = run_cli("explain", model, image, "--top-k", "3", "--json", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    scores = {e["class"]: e["score"] for e in json.loads(result.stdout)["results"]}
    x = reference_preprocess(rgb, (6, 10), meta["mean"], meta["std"], meta["scale"], "BGR", "NHWC")
    np.testing.assert_allclose([scores[k] for k in range(3)], x.reshape(-1, 3).mean(axis=0),
                               atol=level(0.002, meta["std"]), rtol=0)


# ------------------------------------------------------------------ read_image


def test_read_image_gives_rgb_in_file_order(tmp_path, rgb):
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), rgb[..., ::-1])            # OpenCV writes BGR: the file holds rgb's colours
    got = read_image(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, rgb)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_images_are_scaled_with_rounding(tmp_path, suffix):
    rng = np.random.default_rng(1)
    rgb16 = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    rgb16[0, 0] = (0, 65535, 1000)                      # 1000 / 257 = 3.89 -> 4 (OpenCV's PNG path gives 3)
    path = tmp_path / f"deep{suffix}"
    cv2.imwrite(str(path), rgb16[..., ::-1])
    got = read_image(path)
    np.testing.assert_array_equal(got, np.rint(rgb16 * 255.0 / 65535.0).astype(np.uint8))
    assert tuple(got[0, 0]) == (0, 255, 4)


def test_grayscale_gives_three_equal_channels(tmp_path):
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), gray)
    np.testing.assert_array_equal(read_image(path), np.repeat(gray[..., None], 3, axis=2))


def test_alpha_is_dropped(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[..., 3] = 0                                      # fully transparent: colours kept as stored
    path = tmp_path / "rgba.png"
    cv2.imwrite(str(path), rgba[..., [2, 1, 0, 3]])
    np.testing.assert_array_equal(read_image(path), rgba[..., :3])


def test_float_images_are_refused_with_a_fix(tmp_path):
    path = tmp_path / "float.tif"
    cv2.imwrite(str(path), np.full((4, 4, 3), 0.5, np.float32))
    with pytest.raises(OnnxcamError) as info:
        read_image(path)
    assert str(info.value) == (f"input {path} has float32 pixels; onnxcam reads 8- and 16-bit images, so "
                               "convert it (or pass a .npy array already preprocessed)")


# ------------------------------------------------------------------ pictures


def test_jet_endpoints_by_hand():
    heat = jet_heatmap(np.array([[0.0, 1.0]], np.float32))
    assert tuple(heat[0, 0]) == JET_LOW_RGB and tuple(heat[0, 1]) == JET_HIGH_RGB
    cam = np.random.default_rng(3).random((9, 13)).astype(np.float32)
    np.testing.assert_array_equal(jet_heatmap(cam), reference_jet(cam))
    np.testing.assert_array_equal(jet_heatmap(cam * 3 - 1), reference_jet(cam * 3 - 1))   # clipped to [0, 1]


def _peaked_map():
    """7x9 map: 1 at (1, 2), 0 at (5, 7), smooth elsewhere."""
    yy, xx = np.mgrid[0:7, 0:9]
    near = np.exp(-((yy - 1) ** 2 + (xx - 2) ** 2) / 4.0)
    far = np.exp(-((yy - 5) ** 2 + (xx - 7) ** 2) / 4.0)
    cam = near - far
    return ((cam - cam.min()) / (cam.max() - cam.min())).astype(np.float32)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_equals_the_blend_at_the_photo_size(alpha):
    photo = np.random.default_rng(4).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    cam = _peaked_map()
    got = overlay(photo, cam, alpha)
    assert got.shape == photo.shape and got.dtype == np.uint8
    want = reference_overlay(photo, cam, alpha)
    # onnxcam quantises the map to 8 bits before resizing it (uint8 work at full size): that moves about
    # 20 % of the pixels by up to one colormap step (at most 4 in a channel, times alpha); measured mean
    # 0.79 * alpha, max 5 at alpha 1
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 4 * alpha + 1 and diff.mean() <= 2 * alpha, (diff.max(), diff.mean())
    if alpha == 0.0:
        np.testing.assert_array_equal(got, photo)


def test_overlay_is_hot_at_the_peak_and_cold_at_the_trough():
    photo = np.full((70, 90, 3), 128, np.uint8)
    picture = overlay(photo, _peaked_map(), 1.0)
    # map cell (r, c) of a 7x9 map covers photo pixels (10 r .. 10 r + 9, 10 c .. 10 c + 9)
    assert is_hot(picture[15, 25]), picture[15, 25]
    assert is_cold(picture[55, 75]), picture[55, 75]
    halves = np.zeros((70, 90), np.float32)
    halves[:35] = 1.0                                           # top half high, bottom half low
    half = overlay(photo, halves, 0.3)
    np.testing.assert_allclose(half[10, 10], 0.7 * 128 + 0.3 * np.array(JET_HIGH_RGB), atol=0.5)
    np.testing.assert_allclose(half[60, 10], 0.7 * 128 + 0.3 * np.array(JET_LOW_RGB), atol=0.5)


def test_overlay_refuses_alpha_outside_unit_interval():
    with pytest.raises(OnnxcamError) as info:
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), 1.5)
    assert str(info.value) == "--alpha 1.5 must lie in [0, 1]"


def test_grid_lays_out_rows_padded_white():
    panels = [np.full((3, 4, 3), v, np.uint8) for v in (10, 20, 30)]
    canvas = grid(panels, columns=2)
    assert canvas.shape == (6, 8, 3)
    assert (canvas[:3, :4] == 10).all() and (canvas[:3, 4:] == 20).all() and (canvas[3:, :4] == 30).all()
    assert (canvas[3:, 4:] == 255).all()
    assert grid(panels, columns=5).shape == (3, 12, 3)


def test_label_panel_adds_a_white_strip_with_dark_text():
    image = np.zeros((10, 120, 3), np.uint8)
    panel = label_panel(image, "gradcam")
    assert panel.shape == (34, 120, 3)
    np.testing.assert_array_equal(panel[24:], image)
    assert panel[:24].min() < 100 and (panel[:24, -20:] == 255).all()


def test_render_map_1d_band_is_hot_where_the_map_is_high():
    cam = np.linspace(1.0, 0.0, 16).astype(np.float32)        # high at the start, low at the end
    picture = render_map(np.sin(np.arange(16.0))[None], cam)
    assert picture.shape == (256, 768, 3)
    assert is_hot(picture[-5, 2]) and is_cold(picture[-5, -3])


def test_render_map_2d_is_the_colouring_of_the_map():
    cam = _peaked_map()
    picture = render_map(np.zeros((1, 7, 9), np.float32), cam)
    assert picture.shape == (256, 256, 3)
    # nearest-neighbour upscaling of the JET colouring
    rows = (np.arange(256) * 7 // 256)
    cols = (np.arange(256) * 9 // 256)
    np.testing.assert_array_equal(picture, reference_jet(cam)[rows][:, cols])


def test_render_map_3d_shows_the_three_mid_slices():
    volume = np.zeros((5, 6, 7), np.float32)
    volume[2, 3, 3] = 1.0                                      # the peak lies on all three mid-slices
    picture = render_map(np.zeros((1, 5, 6, 7), np.float32), volume)
    assert picture.shape == (256, 768, 3)
    # slice d=2 (6x7): pixel (3, 3); slice h=3 (5x7): (2, 3); slice w=3 (5x6): (2, 3)
    for panel, (r, c, h, w) in enumerate([(3, 3, 6, 7), (2, 3, 5, 7), (2, 3, 5, 6)]):
        y, x = int((r + 0.5) * 256 / h), int((c + 0.5) * 256 / w) + 256 * panel
        assert is_hot(picture[y, x]) and is_cold(picture[2, 256 * panel + 2]), panel


def test_bilinear_reference_matches_opencv_on_floats():
    """The hand-written reference itself, checked once against OpenCV's float resize."""
    cam = np.random.default_rng(5).random((7, 9)).astype(np.float32)
    np.testing.assert_allclose(bilinear_resize(cam, 23, 37), cv2.resize(cam, (37, 23)), atol=1e-6)
