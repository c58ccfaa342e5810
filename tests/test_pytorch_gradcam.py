"""onnxcam against pytorch-grad-cam itself (grad-cam 1.5.7) on a torch net exported in the test: the
maps of Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, EigenCAM and Score-CAM, with a dead (all
zero) and a constant non-zero channel at the explained layer, so Score-CAM's constant-channel rule is
compared with the tool it follows, not with a copy of onnxcam's rule.

grad-cam needs torchvision, and the torchvision that matches the test environment's torch==2.13.0 does
not import there, so these tests are skipped in the CI environments and run in the bench environment
(``bash tools/setup_bench.sh``; torch 2.14.1, torchvision 0.29.1):

    PYTHONPATH=. .venv-bench/bin/python -m pytest -q -p no:cacheprovider tests/test_pytorch_gradcam.py
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except Exception as exc:   # absent, or torchvision built for another torch (RuntimeError at import)
    pytest.skip(f"pytorch-grad-cam not importable here ({type(exc).__name__}: {exc}); run in the bench "
                "environment (tools/setup_bench.sh)", allow_module_level=True)

from onnxcam import Explainer  # noqa: E402

# measured: <= 4.2e-7 for every method (float32 both sides); about 10x
ATOL = 3e-6
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
           "hirescam": "HiResCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.relu1, self.relu2 = torch.nn.ReLU(), torch.nn.ReLU()
        self.fc = torch.nn.Linear(6, 5)
        with torch.no_grad():
            self.conv2.bias[1] = -100.0                   # channel 1: dead after ReLU (all zero)
            self.conv2.weight[2] = 0.0                    # channel 2: constant 0.3 after ReLU
            self.conv2.bias[2] = 0.3

    def forward(self, x):
        a = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(a.mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = Net().eval()
    path = tmp_path_factory.mktemp("g") / "net.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 20, 20), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    x = np.random.default_rng(0).normal(size=(3, 3, 20, 20)).astype(np.float32)
    return net, path, x


def _node(path):
    from onnxcam.nodes import list_candidates
    import onnx
    candidates = [c for c in list_candidates(onnx.load(str(path))) if c.spatial and c.op_type == "Relu"]
    return candidates[-1].name


@pytest.mark.parametrize("method", list(METHODS))
def test_maps_equal_pytorch_grad_cam(exported, method):
    net, path, x = exported
    targets = [0, 3, 4]
    with getattr(pytorch_grad_cam, METHODS[method])(model=net, target_layers=[net.relu2]) as cam:
        theirs = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in targets])
    explainer = Explainer(str(path), _node(path), cache=False)
    ours = explainer.explain(x, method=method, targets=None if method == "eigencam" else targets).maps
    assert np.abs(ours - theirs).max() <= ATOL
