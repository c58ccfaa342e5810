"""Map outputs (N, K, H, W): the target sums a class's logits over a mask, through the same head."""
import numpy as np
import pytest
from onnx import numpy_helper

from onnxcam import Explainer, OnnxcamError
from onnxcam.methods.postprocess import fuse_layers, layer_to_input
from tiny_models import tiny_segmenter


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def explainer(model):
    return Explainer(model, "/enc/Relu", grad_backend="portable")


def test_gradcam_with_mask_equals_closed_form(explainer, model):
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    mask = np.zeros((8, 8), np.float32)
    mask[2:5, 3:7] = 1.0
    result = explainer.explain(x, targets=[1, 2], target_mask=mask)
    head = numpy_helper.to_array(model.graph.initializer[1])[:, :, 0, 0]       # (K, C)
    activations = explainer.forward(x)[1]
    weights = head[[1, 2]] * mask.mean()                                        # mean_S(W[c,k] M)
    layer = np.maximum(np.einsum("nc,nchw->nhw", weights, activations), 0)
    np.testing.assert_allclose(result.maps, fuse_layers([layer_to_input(layer, (8, 8))]), atol=1e-5)
    logits = explainer.forward(x)[0]
    np.testing.assert_allclose(result.scores, [(logits[0, 1] * mask).sum(), (logits[1, 2] * mask).sum()],
                               rtol=1e-5)


def test_per_sample_masks_and_score_cam(explainer):
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    masks = np.zeros((2, 8, 8), np.float32)
    masks[0, :4], masks[1, 4:] = 1.0, 1.0
    for method in ("gradcam", "scorecam", "layercam"):
        maps = explainer.explain(x, method=method, targets=0, target_mask=masks).maps
        assert maps.shape == (2, 8, 8) and np.isfinite(maps).all()


def test_map_output_needs_a_target(explainer):
    with pytest.raises(OnnxcamError, match="say which class"):
        explainer.explain(np.zeros((1, 3, 8, 8), np.float32))


def test_mask_of_wrong_shape(explainer):
    with pytest.raises(OnnxcamError, match="output map is"):
        explainer.explain(np.zeros((1, 3, 8, 8), np.float32), targets=0, target_mask=np.ones((4, 4)))
