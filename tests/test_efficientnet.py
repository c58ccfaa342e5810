"""The real pretrained EfficientNet-Lite0, exported by torch's legacy and dynamo exporters, explained on
real photos: predictions, and every map against torch autograd on the same weights and inputs."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_oracle  # noqa: E402
from onnxcam import METHODS, Explainer  # noqa: E402

EGYPTIAN_CAT = 285
# Tolerances: about 10x the largest difference measured by tools/measure_efficientnet_errors.py (and
# for argmax Grad-CAM on all four photos, the same comparison with the arg-max targets) over both exports:
MAP_ATOL = 1.5e-5            # maps, every photo: measured <= 1.43e-6
SCORECAM_ATOL = 7e-5         # Score-CAM at _blocks.15 (320 masked passes): measured 7.1e-6
ACTIVATION_REL = 1.5e-5      # activations, relative L2: measured <= 1.46e-6
LAST_BLOCK_GRAD_REL = 1.5e-6  # d logit / dA at _blocks.15, every photo: measured <= 1.51e-7


@pytest.fixture(scope="module")
def export(efficientnet_onnx):
    kind = "dynamo" if efficientnet_onnx.name.endswith("_dynamo.onnx") else "legacy"
    return kind, efficientnet_onnx


@pytest.fixture(scope="module")
def torch_model(efficientnet_torch):
    return efficientnet_torch


def head_activation(torch_model):
    """The default node: the ReLU6 after the conv head (second use of the shared `_swish` module)."""
    return torch_model._swish, -1


def test_chelsea_is_an_egyptian_cat(export, photos):
    _, path = export
    explainer = Explainer(str(path), "auto")
    result = explainer.explain(photos[:1])
    assert result.targets[0] == EGYPTIAN_CAT
    assert explainer.model.class_names[EGYPTIAN_CAT] == "Egyptian cat"


def test_gradcam_equals_torch_autograd(export, photos, torch_model):
    _, path = export
    explainer = Explainer(str(path), "auto")
    result = explainer.explain(photos)
    module, call = head_activation(torch_model)
    reference = torch_oracle.reference_maps("gradcam", torch_model, module, photos, result.targets, call)
    assert np.abs(result.maps - reference).max() <= MAP_ATOL


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("gradcam", "scorecam", "legrad")])
def test_methods_equal_torch_reference(export, photos, torch_model, method):
    kind, path = export
    if kind == "dynamo":
        pytest.skip("the other methods share the gradients checked above; one export suffices")
    explainer = Explainer(str(path), "auto")
    result = explainer.explain(photos[:2], method=method, targets=[EGYPTIAN_CAT, 504])
    module, call = head_activation(torch_model)
    reference = torch_oracle.reference_maps(method, torch_model, module, photos[:2], result.targets, call,
                                            fc_weight=torch_model._fc.weight.detach().numpy())
    assert np.abs(result.maps - reference).max() <= MAP_ATOL


def test_scorecam_equals_torch_forward_passes(export, photos, torch_model):
    kind, path = export
    if kind == "dynamo":
        pytest.skip("one export suffices")
    explainer = Explainer(str(path), "_blocks.15")          # 320 channels: 320 masked forward passes
    result = explainer.explain(photos[:1], method="scorecam", targets=[EGYPTIAN_CAT], batch_size=64)
    reference = torch_oracle.reference_maps("scorecam", torch_model, torch_model._blocks[15], photos[:1],
                                            [EGYPTIAN_CAT])
    assert np.abs(result.maps - reference).max() <= SCORECAM_ATOL


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def gradients_vs_autograd(path, photos, torch_model, scope):
    explainer = Explainer(str(path), scope, grad_backend="portable")
    _, runner = explainer.gradient_session()
    targets = [EGYPTIAN_CAT, 504, 1, 999]
    weights = np.zeros((4, 1000), np.float32)
    weights[np.arange(4), targets] = 1
    _, A, G = runner.run({"input": photos, "onnxcam_target_weights": weights})
    A_ref, G_ref, _ = torch_oracle.activations_and_gradients(torch_model, torch_model.get_submodule(scope),
                                                             photos, targets)
    assert relative_error(A, A_ref) <= ACTIVATION_REL
    return [relative_error(G[i], G_ref[i]) for i in range(len(G))]


def test_portable_gradients_equal_autograd_last_block(export, photos, torch_model):
    """d logit / d A at the last block: relative (L2) error <= 1.5e-6 for every photo."""
    assert max(gradients_vs_autograd(export[1], photos, torch_model, "_blocks.15")) <= LAST_BLOCK_GRAD_REL


def test_portable_gradients_equal_autograd_early_block(export, photos, torch_model):
    """Fourteen blocks deep (Conv, depthwise Conv, folded BatchNorm, ReLU6, residual Add).

    ORT and torch round the forward pass differently (~1e-7); where a ReLU6 input lies that close to 0
    or 6 the two take different gates, and the backward through the remaining blocks carries that
    difference (measured 0.02-0.54 % for such photos: legacy chelsea/rocket/astronaut, dynamo
    chelsea/astronaut). This is the one documented exception to the strict tolerance: the coffee photo,
    whose gates agree in both graphs (measured 6.7e-7), must match to 1e-5, which a wrong rule could not;
    the others stay within 1 %.
    """
    errors = gradients_vs_autograd(export[1], photos, torch_model, "_blocks.1")
    assert errors[1] <= 1e-5, errors            # coffee
    assert max(errors) <= 1e-2, errors
