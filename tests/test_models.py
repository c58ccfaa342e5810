"""The models the project owns: the committed shapes CNN and the EfficientNet-Lite0 exports.

EfficientNet tests build the model once per cache (``.cache/models/`` at the repository root, reused
while up to date) with the legacy and the dynamo exporter, and compare them with torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

ort = pytest.importorskip("onnxruntime")
shapes_data = pytest.importorskip("shapes_data")  # needs opencv

SHAPES_MODEL = ROOT / "models" / "shapes_cnn.onnx"
CACHE = ROOT / ".cache" / "models"
FRESH_SEED = 20240611  # none of the seeds used to train, validate or record the model
ACCURACY_MARGIN = 0.03


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="module")
def shapes_model() -> onnx.ModelProto:
    return onnx.load(str(SHAPES_MODEL))


@pytest.fixture(scope="module")
def fresh_shapes():
    return shapes_data.make_dataset(500, FRESH_SEED)


def test_shapes_dataset_is_deterministic_and_well_formed():
    images, labels, boxes = shapes_data.make_dataset(40, 7)
    again = shapes_data.make_dataset(40, 7)
    other = shapes_data.make_dataset(40, 8)
    assert images.shape == (40, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again[0]) and np.array_equal(labels, again[1]) and np.array_equal(boxes, again[2])
    assert not np.array_equal(images, other[0])
    assert np.array_equal(np.bincount(labels), [8] * len(shapes_data.CLASS_NAMES))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (sides >= 8).all()


def test_shapes_preprocess_follows_the_metadata_formula():
    images, _, _ = shapes_data.make_dataset(2, 3)
    spec = shapes_data.PREPROCESS
    x = shapes_data.preprocess(images)
    expected = (images[1, 5, 9] * spec["scale"] - np.array(spec["mean"])) / np.array(spec["std"])
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, :, 5, 9], expected, rtol=1e-6)
    large = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 128x128 is resized back to 64x64
    assert shapes_data.preprocess(large).shape == (2, 3, 64, 64)


def test_shapes_model_is_small_and_carries_its_metadata(shapes_model):
    assert SHAPES_MODEL.stat().st_size < 1_000_000
    onnx.checker.check_model(shapes_model)
    props = metadata(shapes_model)
    assert json.loads(props["onnxcam.preprocess"]) == shapes_data.PREPROCESS
    assert json.loads(props["onnxcam.class_names"]) == shapes_data.CLASS_NAMES
    assert 0.9 <= float(props["onnxcam.shapes_accuracy"]) <= 1.0
    assert [i.name for i in shapes_model.graph.input] == ["input"]
    assert [o.name for o in shapes_model.graph.output] == ["logits"]


def test_shapes_model_accuracy_holds_on_a_fresh_set(shapes_model, fresh_shapes):
    images, labels, _ = fresh_shapes
    session = ort.InferenceSession(SHAPES_MODEL.as_posix(), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": shapes_data.preprocess(images)})[0]
    assert logits.shape == (len(images), len(shapes_data.CLASS_NAMES))
    recorded = float(metadata(shapes_model)["onnxcam.shapes_accuracy"])
    assert (logits.argmax(1) == labels).mean() >= recorded - ACCURACY_MARGIN


def test_shapes_model_cam_peaks_inside_the_true_box(shapes_model, fresh_shapes):
    """CAM from the graph itself: the ReLU that feeds global average pooling, times the Gemm row of
    the predicted class. With GAP -> Linear this is Grad-CAM on that ReLU up to a positive factor."""
    images, _, boxes = fresh_shapes
    pool = next(n for n in shapes_model.graph.node if n.op_type == "GlobalAveragePool")
    gemm = next(n for n in shapes_model.graph.node if n.op_type == "Gemm")
    weights = onnx.numpy_helper.to_array(next(i for i in shapes_model.graph.initializer if i.name == gemm.input[1]))
    exposed = onnx.ModelProto()
    exposed.CopyFrom(shapes_model)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(pool.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, activations = session.run(["logits", pool.input[0]], {"input": shapes_data.preprocess(images)})
    assert activations.shape[2:] == (16, 16)
    import cv2

    hits = 0
    for activation, row, box in zip(activations, logits, boxes):
        cam = np.maximum(np.tensordot(weights[row.argmax()], activation, axes=1), 0)
        cam = cv2.resize(cam / (cam.max() + 1e-7), (64, 64), interpolation=cv2.INTER_LINEAR)
        y, x = np.unravel_index(np.argmax(cam), cam.shape)
        hits += box[0] <= x < box[2] and box[1] <= y < box[3]
    assert hits / len(images) >= 0.9


# --- EfficientNet-Lite0 (built from the pip-installed weights, cached) ---------------------------

def test_efficientnet_export_matches_torch_and_knows_the_cat(efficientnet_onnx, efficientnet_torch, efficientnet_tools):
    import torch
    from skimage import data

    batch = np.concatenate([efficientnet_tools.preprocess_image(data.chelsea()),
                            efficientnet_tools.preprocess_image(data.coffee())])
    session = ort.InferenceSession(efficientnet_onnx.as_posix(), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": batch})[0]
    with torch.no_grad():
        expected = efficientnet_torch(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert logits[0].argmax() == 285  # Egyptian cat
    assert logits[1].argmax() in (504, 967, 968)  # coffee mug, espresso, cup


def test_efficientnet_metadata_names_the_classes(efficientnet_onnx, efficientnet_tools):
    props = metadata(onnx.load(str(efficientnet_onnx), load_external_data=False))
    names = json.loads(props["onnxcam.class_names"])
    assert len(names) == 1000
    assert (names[281], names[282], names[285], names[504], names[967]) == (
        "tabby", "tiger cat", "Egyptian cat", "coffee mug", "espresso")
    assert json.loads(props["onnxcam.preprocess"]) == efficientnet_tools.PREPROCESS


def test_efficientnet_build_skips_when_up_to_date(efficientnet_onnx, efficientnet_tools, capsys):
    dynamo = efficientnet_onnx.name.endswith("_dynamo.onnx")
    before = efficientnet_onnx.stat().st_mtime_ns
    efficientnet_tools.build(efficientnet_onnx, dynamo=dynamo)
    assert "up to date" in capsys.readouterr().out
    assert efficientnet_onnx.stat().st_mtime_ns == before


# --- the export helpers other tests use ---------------------------------------------------------

def test_torch_export_helpers_give_a_dynamic_batch_and_keep_module_scopes(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from torch_export import export_dynamo, export_legacy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    batch = torch.randn(3, 2, 16)
    with torch.no_grad():
        expected = net(batch).numpy()
        paths = [export_legacy(net, batch[:1], tmp_path / "legacy.onnx"),
                 export_dynamo(net, batch[:1], tmp_path / "dynamo.onnx")]
    assert (tmp_path / "dynamo.onnx.data").exists()
    for path in paths:
        session = ort.InferenceSession(path.as_posix(), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input"]
        np.testing.assert_allclose(session.run(["logits"], {"input": batch.numpy()})[0], expected, atol=1e-5)
    conv = next(n for n in onnx.load(str(paths[1]), load_external_data=False).graph.node if n.op_type == "Conv")
    scopes = {p.key: p.value for p in conv.metadata_props}["pkg.torch.onnx.name_scopes"]
    assert "'0'" in scopes  # the Conv1d is module "0" of the Sequential
