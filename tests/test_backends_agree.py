"""The two gradient backends give the same gradients and maps (runs where onnxruntime-training is
installed: the .venv-training environment of tools/run_tests.sh)."""
from pathlib import Path

import numpy as np
import pytest

from onnxcam import Explainer
from onnxcam.gradients import ort_training_available
from tiny_models import small_resnet

pytestmark = pytest.mark.skipif(not ort_training_available(), reason="needs onnxruntime-training")


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("tensor", ["stem", "res"])
def test_portable_equals_ort_training(tensor, nhwc):
    model = small_resnet(nhwc=nhwc)
    shape = (4, 16, 16, 3) if nhwc else (4, 3, 16, 16)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    results = {}
    for backend in ("portable", "ort-training"):
        explainer = Explainer(model, tensor, grad_backend=backend)
        augmented, runner = explainer.gradient_session()
        assert augmented.backend == backend
        weights = np.zeros((4, 5), np.float32)
        weights[[0, 1], [2, 4]] = 1.0          # two explicit targets, two arg-max rows
        results[backend] = (runner.run({"input": x, "onnxcam_target_weights": weights}),
                            explainer.explain(x, "gradcam++", targets=[1, 2, 3, 4]).maps)
    (p_out, p_maps), (t_out, t_maps) = results["portable"], results["ort-training"]
    gradient_p, gradient_t = p_out[2], t_out[2]
    scale = np.abs(gradient_t).max()
    assert scale > 0
    np.testing.assert_allclose(gradient_p, gradient_t, atol=1.5e-6 * scale)   # measured <= 1.2e-7 * scale
    np.testing.assert_allclose(p_out[0], t_out[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p_maps, t_maps, atol=3e-6)                     # measured <= 3e-7


def test_auto_prefers_portable_when_every_op_has_a_rule():
    explainer = Explainer(small_resnet(), "res", grad_backend="auto")
    explainer.explain(np.zeros((1, 3, 16, 16), np.float32))
    assert explainer.gradient_backend_used == "portable"


REAL_EXPORTS = [Path(__file__).resolve().parents[1] / ".cache" / "models" / name
                for name in ("efficientnet_lite0.onnx", "efficientnet_lite0_dynamo.onnx")]


@pytest.mark.parametrize("path", REAL_EXPORTS, ids=["legacy", "dynamo"])
@pytest.mark.parametrize("scope", ["_blocks.15", "_blocks.1"], ids=["last-block", "early-block"])
def test_backends_agree_on_efficientnet(path, scope):
    """The real pretrained EfficientNet-Lite0 exports (built by the torch environment's tests into
    .cache/models; skipped where absent): portable and ort-training gradients, relative L2 <= 1e-5."""
    if not path.exists():
        pytest.skip(f"{path.name} is built by the main test environment first")
    x = np.random.default_rng(0).normal(0, 0.5, (2, 3, 224, 224)).astype(np.float32)
    weights = np.zeros((2, 1000), np.float32)
    weights[0, 285] = 1.0                                     # one explicit target, one arg-max row
    gradients = {}
    for backend in ("portable", "ort-training"):
        explainer = Explainer(str(path), scope, grad_backend=backend, cache=False)
        _, runner = explainer.gradient_session()
        gradients[backend] = runner.run({"input": x, "onnxcam_target_weights": weights})[2]
    p, t = gradients["portable"], gradients["ort-training"]
    errors = [float(np.linalg.norm(p[i] - t[i]) / np.linalg.norm(t[i])) for i in range(len(x))]
    assert max(errors) <= 1e-5, errors
