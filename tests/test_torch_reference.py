"""Every method on small torch nets (1D, 2D, 3D) exported to ONNX equals the torch reference on the
same weights and inputs (autograd for gradients, torch forward passes for Score-CAM)."""
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from onnxcam import METHODS, Explainer  # noqa: E402
import torch_oracle  # noqa: E402
from torch_export import export_legacy  # noqa: E402

TOLERANCE = 1e-5   # about 10x the largest difference measured (8.3e-7, over every method, rank and fusion)


def conv_net(rank: int, channels=(3, 8, 12), classes=4) -> "nn.Module":
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[rank]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                conv(channels[0], channels[1], 3, padding=1), bn(channels[1]), nn.ReLU(),
                conv(channels[1], channels[2], 3, stride=2, padding=1), bn(channels[2]), nn.ReLU6())
            self.pool = pool(1)
            self.fc = nn.Linear(channels[2], classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    torch.manual_seed(rank)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in net.modules():
            if isinstance(module, bn):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return net.eval()


SHAPES = {1: (3, 3, 32), 2: (3, 3, 16, 16), 3: (2, 3, 8, 8, 8)}


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["1d", "2d", "3d"])
def case(request, tmp_path_factory):
    rank = request.param
    net = conv_net(rank)
    x = np.random.default_rng(rank).normal(size=SHAPES[rank]).astype(np.float32)
    path = export_legacy(net, torch.from_numpy(x[:1]), tmp_path_factory.mktemp("nets") / f"net{rank}d.onnx")
    explainer = Explainer(str(path), "features.5", grad_backend="portable")   # the ReLU6 module
    return net, x, explainer


@pytest.mark.parametrize("method", [m for m in METHODS if m != "legrad"])   # LeGrad: test_legrad.py
def test_method_equals_torch_reference(case, method):
    net, x, explainer = case
    targets = [1, 3, 0][: len(x)]
    result = explainer.explain(x, method=method, targets=targets)
    reference = torch_oracle.reference_maps(method, net, net.features[5], x, targets,
                                            fc_weight=net.fc.weight.detach().numpy())
    assert result.maps.shape == reference.shape
    np.testing.assert_allclose(result.maps, reference, atol=TOLERANCE)


def test_cam_equals_gradcam_for_gap_linear(case):
    _, x, explainer = case
    np.testing.assert_allclose(explainer.explain(x, "cam").maps, explainer.explain(x, "gradcam").maps,
                               atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "scorecam"])
def test_several_nodes_fuse_like_the_reference(case, method):
    """Two nodes: per-layer maps normalised and resized, then relu, mean and normalised again."""
    net, x, _ = case
    rank = x.ndim - 2
    path = export_legacy(net, torch.from_numpy(x[:1]), Path(tempfile.mkdtemp()) / f"fuse{rank}d.onnx")
    explainer = Explainer(str(path), ["features.2", "features.5"], grad_backend="portable")
    targets = [2, 0, 1][: len(x)]
    result = explainer.explain(x, method=method, targets=targets)
    layers = []
    for module in (net.features[2], net.features[5]):
        A, G, _ = torch_oracle.activations_and_gradients(net, module, x, targets)
        weights = torch_oracle.scorecam_weights(net, A, x, targets) if method == "scorecam" else None
        layers.append(torch_oracle.layer_map(method, A, G, weights))
    np.testing.assert_allclose(result.maps, torch_oracle.final_maps(layers, x.shape[2:]), atol=TOLERANCE)
