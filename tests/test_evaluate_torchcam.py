"""Average Drop, Increase in Confidence, Deletion and Insertion equal torchcam 0.5.0's metrics on the
same torch model, the same maps (onnxcam's, handed to torchcam) and the same settings."""
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchcam_metrics = pytest.importorskip("torchcam.metrics", reason="torchcam 0.5.0 is in the test extra")

from onnxcam import Explainer  # noqa: E402
from onnxcam.evaluate import Evaluator  # noqa: E402
from onnxcam.evaluate.perturb import make_baseline  # noqa: E402

RTOL = 1e-4


class GivenMaps:
    """A torchcam CAM extractor that returns fixed maps: torchcam then scores exactly onnxcam's maps."""

    def __init__(self, model, maps: np.ndarray):
        self.model = model
        self.maps = torch.from_numpy(np.ascontiguousarray(maps))

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def torchcam_scores(model, x, maps, steps, baseline, batch_size=16):
    extractor = GivenMaps(model, maps)
    softmax = partial(torch.softmax, dim=-1)
    classification = torchcam_metrics.ClassificationMetric(extractor, softmax)
    curves = torchcam_metrics.DeletionInsertionMetric(extractor, softmax, steps=steps, batch_size=batch_size,
                                                      baseline=baseline)
    inputs = torch.from_numpy(x)
    classification.update(inputs)
    curves.update(inputs)
    return {**classification.summary(), **curves.summary()}


def onnxcam_scores(evaluator, x, method):
    results = evaluator.evaluate(x, method)
    summary = {name: float(np.mean([r.values[name] for r in results]))
               for name in ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc")}
    return summary, evaluator.last_maps


def assert_same(ours, theirs):
    pairs = {"average_drop": 100 * theirs["avg_drop"], "increase_in_confidence": 100 * theirs["conf_increase"],
             "deletion_auc": theirs["deletion_auc"], "insertion_auc": theirs["insertion_auc"]}
    for name, expected in pairs.items():
        assert ours[name] == pytest.approx(expected, rel=RTOL, abs=1e-9), (name, ours[name], expected)


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 6)
        with torch.no_grad():
            self.head.weight.mul_(12.0)      # confident predictions, so the curves and AD move
            self.head.bias[0] += 1.5         # class 0 wins on faint inputs: masking can raise confidence

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    import torch_export
    net = SmallNet().eval()
    path = torch_export.export_legacy(net, torch.zeros(1, 3, 32, 32), tmp_path_factory.mktemp("net") / "net.onnx")
    x = np.random.default_rng(1).normal(size=(10, 3, 32, 32)).astype(np.float32)
    x *= np.linspace(0.5, 2.0, len(x), dtype=np.float32)[:, None, None, None]    # faint to strong inputs
    return net, path, x


@pytest.mark.parametrize("method,baseline", [("gradcam", "zero"), ("layercam", "blur"), ("scorecam", "mean")])
def test_small_net_matches_torchcam(small_net, method, baseline):
    net, path, x = small_net
    evaluator = Evaluator(Explainer(str(path), "/features/features.4/Relu"), steps=20, baseline=baseline,
                          batch_size=16)
    ours, maps = onnxcam_scores(evaluator, x, method)
    theirs = torchcam_scores(net, x, maps, 20, lambda t: torch.from_numpy(make_baseline(t.numpy(), baseline)))
    assert_same(ours, theirs)
    assert 0 < ours["increase_in_confidence"] < 100 and ours["average_drop"] > 1   # neither metric is trivial


def test_efficientnet_matches_torchcam(efficientnet_onnx, efficientnet_torch, photos):
    """10 steps (20 on the small net above) keeps torch's share of the suite's time small."""
    evaluator = Evaluator(Explainer(str(efficientnet_onnx), "_blocks.15"), steps=10, batch_size=32)
    ours, maps = onnxcam_scores(evaluator, photos, "gradcam")
    theirs = torchcam_scores(efficientnet_torch, photos, maps, 10, None, batch_size=32)
    assert_same(ours, theirs)
