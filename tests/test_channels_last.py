"""A tf2onnx-style NHWC graph (Transposes around every convolution, Keras-3 names) explains like its
NCHW twin with the same weights, with no flag beyond --node."""
import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcam import METHODS, Explainer
from onnxcam.cli import main
from onnxcam.gradients import ort_training_available
from tiny_models import channels_last_1d, keras_mobilenet_like

BACKENDS = ["portable"] + (["ort-training"] if ort_training_available() else [])


@pytest.fixture(scope="module")
def x_nchw():
    return np.random.default_rng(5).normal(size=(3, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "legrad"])   # LeGrad: ViTs only
def test_nhwc_maps_equal_the_nchw_twin(method, backend, x_nchw):
    nhwc = Explainer(keras_mobilenet_like(nhwc=True), "out_relu", grad_backend=backend)
    nchw = Explainer(keras_mobilenet_like(nhwc=False), "out_relu", grad_backend=backend)
    assert nhwc.nodes[0].name == "functional_1/mobilenetv2_1.00_160_1/out_relu_1/Relu6"
    assert nhwc.nodes[0].shape[1:] == (8, 8, 16)                  # activations really are channels-last
    targets = [0, 3, 5]
    channels_last = nhwc.explain(x_nchw.transpose(0, 2, 3, 1), method=method, targets=targets)
    channels_first = nchw.explain(x_nchw, method=method, targets=targets)
    np.testing.assert_array_equal(channels_last.targets, channels_first.targets)
    np.testing.assert_allclose(channels_last.logits, channels_first.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(channels_last.maps, channels_first.maps, atol=1e-5)


def test_auto_node_is_the_last_relu6(x_nchw):
    explainer = Explainer(keras_mobilenet_like(nhwc=True), "auto")
    assert explainer.nodes[0].name.endswith("out_relu_1/Relu6")


def test_cli_needs_no_layout_flag(tmp_path):
    model = tmp_path / "keras.onnx"
    onnx.save(keras_mobilenet_like(nhwc=True), str(model))
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    result = CliRunner().invoke(main, ["explain", str(model), str(image), "--node", "out_relu",
                                       "--out", str(tmp_path / "out"), "--npy"])
    assert result.exit_code == 0, result.output
    assert cv2.imread(str(tmp_path / "out" / "photo_gradcam.png")).shape == (48, 40, 3)
    assert np.load(tmp_path / "out" / "photo_gradcam.npy").shape == (32, 32)


def test_channels_last_1d_model_gives_the_same_maps_through_the_cli_and_the_api(tmp_path):
    """The CLI leaves the layout to the one guesser (layouts.py) unless --layout is given: a (N, L, C)
    signal model explains alike through `onnxcam explain` and through the Explainer."""
    model = channels_last_1d()
    path = tmp_path / "nlc.onnx"
    onnx.save(model, str(path))
    signal = np.random.default_rng(3).normal(size=(24, 2)).astype(np.float32)
    np.save(tmp_path / "signal.npy", signal)
    for method in ("gradcam", "scorecam"):
        result = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "signal.npy"), "--node",
                                           "features", "--method", method, "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
        from_cli = np.load(tmp_path / "out" / f"signal_{method}.npy")
        from_api = Explainer(model, "features").explain(signal[None], method=method).maps[0]
        assert from_cli.shape == (24,)
        np.testing.assert_array_equal(from_cli, from_api)
        assert from_api.max() > 0.999 and from_api.min() == 0.0   # a real map, not a blank one
