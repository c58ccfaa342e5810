"""LeGrad on an exported ViT equals torchcam 0.5.0's ``LeGrad`` on the same weights and photos: one block
and several, legacy and dynamo exports, blocks named by their module scope or by the default ViT node
(the last block's ln_1); and a clear refusal on a CNN."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchcam = pytest.importorskip("torchcam.methods")

import torch_oracle  # noqa: E402
from onnxcam import Explainer  # noqa: E402
from onnxcam.errors import OnnxcamError  # noqa: E402
from torch_export import export_dynamo, export_legacy  # noqa: E402
from vit_models import TinyViT, photo_batch  # noqa: E402

SIZE = (32, 48)
# measured: <= 6.6e-7 at grid and at input size, both exporters, 1 to 3 blocks; about 10x
ATOL = 7e-6
BLOCKS = ["encoder/layers/encoder_layer_0", "encoder/layers/encoder_layer_1"]


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def vit(request, tmp_path_factory):
    net = TinyViT(SIZE, depth=3, seed=2).eval()
    path = tmp_path_factory.mktemp("legrad") / f"vit_{request.param}.onnx"
    if request.param == "legacy":
        export_legacy(net, torch.zeros(1, 3, *SIZE), path)
    else:
        export_dynamo(net, torch.zeros(2, 3, *SIZE), path)
    return net, path, photo_batch(SIZE, 3)


def _torchcam_normalise(maps):
    """torchcam's normalisation: subtract the min, divide by (max + 1e-8) (onnxcam divides by max + 1e-7,
    which on raw LeGrad relevances of ~1e-3 alone moves values by ~3e-5)."""
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-8)


def _torchcam(net, blocks, x, targets):
    with torchcam.LeGrad(net, blocks, grid_shape=net.grid) as extractor:
        scores = net(torch.from_numpy(x))
        return extractor(list(targets), scores)[0].detach().numpy()


@pytest.mark.parametrize("which", [[2], [1, 2], [0, 1, 2]])
def test_legrad_equals_torchcam(vit, which):
    net, path, x = vit
    targets = [1, 4, 0]
    layers = list(net.encoder.layers)
    theirs = _torchcam(net, [layers[i] for i in which], x, targets)
    explanation = Explainer(str(path), [f"encoder/layers/encoder_layer_{i}" for i in which], cache=False).explain(
        x, method="legrad", targets=targets)
    assert np.abs(_torchcam_normalise(np.mean(explanation.layer_maps, axis=0)) - theirs).max() <= ATOL
    # at input size: the project's final-map steps (resize, then normalise) on torchcam's grid map
    upsampled = torch_oracle.final_maps([theirs], SIZE)
    assert np.abs(explanation.maps - upsampled).max() <= ATOL


def test_legrad_default_node_and_argmax_target(vit):
    net, path, x = vit
    explainer = Explainer(str(path), "auto", cache=False)        # the last block's ln_1
    ours = explainer.explain(x, method="legrad")
    theirs = _torchcam(net, [list(net.encoder.layers)[-1]], x, ours.targets)
    np.testing.assert_array_equal(ours.targets, net(torch.from_numpy(x)).argmax(1).numpy())
    assert np.abs(_torchcam_normalise(ours.layer_maps[0]) - theirs).max() <= ATOL


def test_legrad_refused_on_a_cnn(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    path = export_legacy(net, torch.zeros(1, 3, 16, 16), tmp_path / "cnn.onnx")
    with pytest.raises(OnnxcamError, match="LeGrad needs a vision transformer"):
        Explainer(str(path), cache=False).explain(np.zeros((1, 3, 16, 16), np.float32), method="legrad")


def test_warm_explainer_reads_the_block_models_from_the_cache(vit, tmp_path, monkeypatch):
    """The blocks' gradient models are cached like the other augmented models: a second Explainer
    builds none (no probe run, no surgery) and gives the same maps, bit for bit."""
    from onnxcam import legrad
    net, path, x = vit
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "cache"))
    cold = Explainer(str(path), BLOCKS).explain(x, method="legrad", targets=[1, 4, 0])

    def no_build(*args, **kwargs):
        raise AssertionError("a block model was built with a warm cache")
    monkeypatch.setattr(legrad, "build_block_model", no_build)
    monkeypatch.setattr(legrad, "with_measured_shapes", no_build)
    warm = Explainer(str(path), BLOCKS).explain(x, method="legrad", targets=[1, 4, 0])
    np.testing.assert_array_equal(warm.maps, cold.maps)
    for a, b in zip(warm.layer_maps, cold.layer_maps):
        np.testing.assert_array_equal(a, b)
    one = Explainer(str(path), BLOCKS[:1]).explain(x, method="legrad", targets=[1, 4, 0])   # cached per block
    np.testing.assert_array_equal(one.layer_maps[0], cold.layer_maps[0])
    other = Explainer(str(path), "encoder/layers/encoder_layer_2")     # not in the cache: built
    with pytest.raises(AssertionError, match="warm cache"):
        other.explain(x, method="legrad", targets=[1, 4, 0])
