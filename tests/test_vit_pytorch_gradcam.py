"""The ViT token path against pytorch-grad-cam itself (grad-cam 1.5.7) with its documented ViT
``reshape_transform``, on the same weights and photos, node given as the module scope of the last
block's ``ln_1`` (pytorch-grad-cam's ``target_layers=[model.encoder.layers[-1].ln_1]``).

grad-cam needs torchvision, which does not import next to the test environment's torch 2.13.0, so
this runs in the bench environment (``bash tools/setup_bench.sh``) and is skipped elsewhere; the
same maps are checked against torch autograd in every environment by tests/test_tokens.py:

    PYTHONPATH=. .venv-bench/bin/python -m pytest -q -p no:cacheprovider tests/test_vit_pytorch_gradcam.py
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except Exception as exc:   # absent, or torchvision built for another torch
    pytest.skip(f"pytorch-grad-cam not importable here ({type(exc).__name__}: {exc}); run in the bench "
                "environment (tools/setup_bench.sh)", allow_module_level=True)

from onnxcam import Explainer  # noqa: E402
from torch_export import export_dynamo, export_legacy  # noqa: E402
from vit_models import TinyViT, photo_batch, vit_reshape_transform  # noqa: E402

SIZE = (32, 48)
# measured: <= 1.6e-6 for the gradient methods and EigenCAM, 3.5e-5 for Score-CAM; about 10x, never
# looser than the 1e-4
ATOL, ATOL_SCORECAM = 1.6e-5, 1e-4
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
           "hirescam": "HiResCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def vit(request, tmp_path_factory):
    net = TinyViT(SIZE).eval()
    path = tmp_path_factory.mktemp("vitgc") / f"vit_{request.param}.onnx"
    if request.param == "legacy":
        export_legacy(net, torch.zeros(1, 3, *SIZE), path)
    else:
        pytest.importorskip("onnxscript")
        export_dynamo(net, torch.zeros(2, 3, *SIZE), path)
    return net, path, photo_batch(SIZE, 3)


@pytest.mark.parametrize("method", list(METHODS))
def test_vit_equals_pytorch_grad_cam(vit, method):
    net, path, x = vit
    targets = [3, 0, 4]
    transform = partial(vit_reshape_transform, height=net.grid[0], width=net.grid[1])
    with getattr(pytorch_grad_cam, METHODS[method])(model=net, target_layers=[net.encoder.layers[-1].ln_1],
                                                     reshape_transform=transform) as cam:
        theirs = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in targets])
    explainer = Explainer(str(path), "encoder/layers/encoder_layer_1/ln_1", cache=False)
    ours = explainer.explain(x, method=method, targets=None if method == "eigencam" else targets).maps
    assert np.abs(ours - theirs).max() <= (ATOL_SCORECAM if method == "scorecam" else ATOL)
