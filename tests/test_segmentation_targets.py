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


# ---- per-sample masks, by value, against torch (autograd for gradients, torch forward passes for
# Score-CAM): each sample's score is its own target class summed over its own mask

MASK_METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "scorecam"]


def _torch_segmenter(model):
    torch = pytest.importorskip("torch")
    weights = {init.name: numpy_helper.to_array(init).copy() for init in model.graph.initializer}

    class Segmenter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_w = torch.nn.Parameter(torch.from_numpy(weights["conv_w"]))
            self.head_w = torch.nn.Parameter(torch.from_numpy(weights["head_w"]))
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            act = self.relu(torch.nn.functional.conv2d(x, self.conv_w, padding=1))
            return torch.nn.functional.conv2d(act, self.head_w)

    return Segmenter()


class MaskedScore:
    """(N, K) scores: each class's logits summed over the sample's mask (one mask for all rows, or one
    per row)."""

    def __init__(self, segmenter, masks):
        import torch
        self.segmenter, self.masks = segmenter, torch.from_numpy(masks)

    def __call__(self, x):
        logits = self.segmenter(x)
        masks = self.masks if self.masks.ndim == 3 else self.masks[None]
        return (logits * masks[:, None]).sum((2, 3))


@pytest.fixture(scope="module")
def per_sample_case(model):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    masks = np.zeros((3, 8, 8), np.float32)
    masks[0, :3, :3] = 1.0
    masks[1, 4:, 2:7] = 1.0
    masks[2, 1:6, 5:] = rng.random((5, 3))                       # a soft mask
    return x, masks, np.array([0, 2, 1])


@pytest.mark.parametrize("method", MASK_METHODS)
def test_per_sample_masks_equal_torch(explainer, model, per_sample_case, method):
    torch_oracle = pytest.importorskip("torch_oracle")
    x, masks, targets = per_sample_case
    segmenter = _torch_segmenter(model)
    A, G, _ = torch_oracle.activations_and_gradients(MaskedScore(segmenter, masks), segmenter.relu, x, targets)
    weights = None
    if method == "scorecam":
        weights = np.concatenate([torch_oracle.scorecam_weights(MaskedScore(segmenter, masks[n]), A[n:n + 1],
                                                                x[n:n + 1], targets[n:n + 1]) for n in range(3)])
    reference = torch_oracle.final_maps([torch_oracle.layer_map(method, A, G, weights)], (8, 8))
    for batch_size in (None, 2):
        result = explainer.explain(x, method=method, targets=targets, target_mask=masks, batch_size=batch_size)
        np.testing.assert_allclose(result.maps, reference, atol=1e-5, rtol=0, err_msg=f"batch_size={batch_size}")
        logits = explainer.forward(x)[0]
        np.testing.assert_allclose(result.scores, [(logits[n, targets[n]] * masks[n]).sum() for n in range(3)],
                                   rtol=1e-5)
    # each sample's own mask matters: scoring all with sample 0's mask gives other scores, and other maps
    # (except Grad-CAM's: here d score / dA = W[c] * M, whose spatial mean only scales the map)
    wrong = explainer.explain(x, method=method, targets=targets, target_mask=np.repeat(masks[:1], 3, 0))
    assert np.abs(wrong.scores[1:] - result.scores[1:]).min() > 1e-2
    if method != "gradcam":
        assert np.abs(wrong.maps[1:] - reference[1:]).max() > 1e-2
