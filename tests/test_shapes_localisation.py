"""The project's own shapes CNN: onnxcam's Grad-CAM peak falls inside the true box of the shape."""
from pathlib import Path

import numpy as np
import pytest

import shapes_data
from onnxcam import Explainer

MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes_cnn.onnx"
HELD_OUT_SEED = 777          # not a training, validation or recording seed


@pytest.fixture(scope="module")
def held_out():
    return shapes_data.make_dataset(400, HELD_OUT_SEED)


def peak_in_box_rate(maps, boxes) -> float:
    hits = 0
    for cam, (x0, y0, x1, y1) in zip(maps, boxes):
        y, x = np.unravel_index(np.argmax(cam), cam.shape)
        hits += x0 <= x < x1 and y0 <= y < y1
    return hits / len(maps)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "cam"])
def test_cam_peak_inside_the_true_box(held_out, method):
    images, labels, boxes = held_out
    explainer = Explainer(str(MODEL), "auto")
    assert explainer.nodes[0].name == "/block4/relu/Relu"
    result = explainer.explain(shapes_data.preprocess(images), method=method, batch_size=100)
    assert (result.targets == labels).mean() >= 0.95
    assert result.maps.shape == (len(images), 64, 64)
    assert peak_in_box_rate(result.maps, boxes) >= 0.9
