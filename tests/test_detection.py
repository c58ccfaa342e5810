"""YOLO-style detectors: NMS against a plain-loop reference on hand-made boxes, decoding by hand, the
detection target's maps against torch autograd on the same box score (a small seeded detector, both
raw head layouts), --box picking the prediction it names, EigenCAM without a target, and the
statement for models with NMS inside the graph."""
from __future__ import annotations

import json

import numpy as np
import pytest

from onnxcam import detection
from onnxcam.errors import OnnxcamError

torch = pytest.importorskip("torch")

import torch_oracle  # noqa: E402
from onnxcam import Explainer  # noqa: E402
from torch_export import export_legacy  # noqa: E402
from vit_models import photo_batch  # noqa: E402
from tiny_yolo import TinyYolo  # noqa: E402

SIZE = (64, 64)
# measured: <= 7.2e-7 (gradcam, hirescam, layercam; both layouts); about 10x
ATOL = 7e-6


# ---------------------------------------------------------------- NMS and decoding (no model)

def reference_nms(boxes, scores, threshold):
    """Greedy NMS in plain loops: take the best remaining box, drop the ones overlapping it more than
    ``threshold``, repeat."""
    def overlap(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        inter = max(w, 0) * max(h, 0)
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0
    remaining = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept = []
    while remaining:
        best = remaining.pop(0)
        kept.append(best)
        remaining = [i for i in remaining if overlap(boxes[best], boxes[i]) <= threshold]
    return kept


HAND_MADE = [
    # two overlapping pairs and a loner
    ([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [21, 19, 31, 29], [50, 50, 60, 70]],
     [0.9, 0.8, 0.7, 0.95, 0.3]),
    # a chain: A overlaps B, B overlaps C, A does not overlap C -> A and C stay
    ([[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10]], [0.9, 0.8, 0.7]),
    # equal scores (index order decides), a box inside another, a zero-area box
    ([[0, 0, 20, 20], [5, 5, 10, 10], [0, 0, 20, 20], [3, 3, 3, 3]], [0.5, 0.5, 0.5, 0.9]),
    # IoU exactly 0.5 is kept at threshold 0.5 (dropped only above it)
    ([[0, 0, 10, 10], [0, 0, 10, 5]], [0.9, 0.8]),
]


@pytest.mark.parametrize("boxes, scores", HAND_MADE)
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_plain_loops(boxes, scores, threshold):
    ours = detection.nms(np.array(boxes, float), np.array(scores), threshold).tolist()
    assert ours == reference_nms(boxes, scores, threshold)


def test_nms_random_boxes_match_plain_loops():
    rng = np.random.default_rng(3)
    for _ in range(20):
        xy = rng.uniform(0, 50, size=(30, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(2, 25, size=(30, 2))], 1)
        scores = rng.uniform(size=30).round(2)          # ties on purpose
        assert detection.nms(boxes, scores, 0.45).tolist() == reference_nms(boxes.tolist(), scores.tolist(), 0.45)


def test_decode_and_detections_by_hand():
    # yolov8 layout (4+K, A) with K = 2, A = 3: cx cy w h rows, then class scores
    raw = np.array([[10, 12, 40], [10, 10, 40], [4, 4, 10], [4, 4, 10],
                    [0.9, 0.8, 0.1], [0.1, 0.2, 0.6]], float)
    boxes, classes = detection.decode(raw, "yolov8")
    np.testing.assert_allclose(boxes, [[8, 8, 12, 12], [10, 8, 14, 12], [35, 35, 45, 45]])
    found = detection.detections(raw, "yolov8", confidence=0.25, iou_threshold=0.3)
    # predictions 0 and 1 (class 0) overlap with IoU 8/24 = 0.33 > 0.3: 1 is dropped
    assert [(d.prediction, d.class_id, d.score) for d in found] == [(0, 0, 0.9), (2, 1, 0.6)]
    # the same head as yolov5 (A, 5+K): objectness 0.5 halves every confidence
    v5 = np.concatenate([raw[:4].T, np.full((3, 1), 0.5), raw[4:].T], 1)
    found5 = detection.detections(v5, "yolov5", confidence=0.25, iou_threshold=0.3)
    assert [(d.prediction, d.class_id, d.score) for d in found5] == [(0, 0, 0.45), (2, 1, 0.3)]
    assert detection.choose(raw, "yolov8", index=1, iou_threshold=0.3).prediction == 2
    assert detection.choose(raw, "yolov8", target=1).prediction == 2
    assert detection.choose(raw, "yolov8", box=(9.5, 8, 14, 12)).prediction == 1     # before NMS
    assert detection.choose(raw, "yolov8", box=(9.5, 8, 14, 12), target=1).class_id == 1
    weights = detection.head_weights([found[1], found[0]], "yolov8", (2, 6, 3))
    assert np.argwhere(weights).tolist() == [[0, 5, 2], [1, 4, 0]]
    targets, masks = detection.as_targets(weights)          # already (N, K, positions)
    assert targets.tolist() == [5, 4] and masks.tolist() == [[0, 0, 1], [1, 0, 0]]
    weights5 = detection.head_weights([found5[1]], "yolov5", (1, 3, 7))
    assert np.argwhere(weights5).tolist() == [[0, 2, 6]]
    targets, masks = detection.as_targets(weights5.transpose(0, 2, 1))   # canonical (N, 5+K, A)
    assert targets.tolist() == [6] and masks.tolist() == [[0, 0, 1]]
    with pytest.raises(OnnxcamError, match="only 2 remain"):
        detection.choose(raw, "yolov8", index=2, iou_threshold=0.3)


def test_format_detection():
    assert detection.detection_format((1, 84, 8400)) == "yolov8"
    assert detection.detection_format((None, 25200, 85)) == "yolov5"
    assert detection.detection_format((1, 84, 8400), "yolov8") == "yolov8"
    with pytest.raises(OnnxcamError, match="cannot tell the detection format"):
        detection.detection_format((1, 20, 20))
    with pytest.raises(OnnxcamError, match=r"\(N, 4\+K, A\) or \(N, A, 5\+K\)"):
        detection.detection_format((1, 1000))
    assert detection.looks_like_detector((None, 84, 8400)) and not detection.looks_like_detector((1, 5, 10))


# ---------------------------------------------------------------- the detector against torch

@pytest.fixture(scope="module", params=["yolov8", "yolov5"])
def detector(request, tmp_path_factory):
    net = TinyYolo(request.param).eval()
    path = export_legacy(net, torch.zeros(1, 3, *SIZE), tmp_path_factory.mktemp("yolo") / f"{request.param}.onnx")
    return request.param, net, path, photo_batch(SIZE, 2)


def _torch_box_maps(net, fmt, x, chosen, method):
    """Autograd of z[n, 4+c, a] (yolov8) / z[n, a, 5+c] (yolov5) at the backbone's output."""
    outputs = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        outputs.append(output)
    handle = net.backbone.register_forward_hook(keep)
    try:
        z = net(torch.from_numpy(x))
        score = sum(z[n, 4 + d.class_id, d.prediction] if fmt == "yolov8" else z[n, d.prediction, 5 + d.class_id]
                    for n, d in enumerate(chosen))
        score.backward()
    finally:
        handle.remove()
    A, G = outputs[0].detach().numpy(), outputs[0].grad.numpy()
    return torch_oracle.final_maps([torch_oracle.layer_map(method, A, G)], SIZE), z.detach().numpy()


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_detection_target_equals_autograd(detector, method):
    fmt, net, path, x = detector
    explainer = Explainer(str(path), "backbone", cache=False)
    scored = explainer.scored_output(x)
    raw = scored.own(explainer.forward(x)[0])
    assert detection.detection_format(raw.shape) == fmt
    chosen = [detection.choose(raw[0], fmt, index=0), detection.choose(raw[1], fmt, index=2)]
    targets, masks = detection.as_targets(scored.canonical(detection.head_weights(chosen, fmt, raw.shape)))
    ours = explainer.explain(x, method=method, targets=targets, target_mask=masks)
    theirs, z = _torch_box_maps(net, fmt, x, chosen, method)
    np.testing.assert_allclose(raw, z, atol=1e-5)
    expected_scores = [z[n, 4 + d.class_id, d.prediction] if fmt == "yolov8" else z[n, d.prediction, 5 + d.class_id]
                       for n, d in enumerate(chosen)]
    np.testing.assert_allclose(ours.scores, expected_scores, rtol=1e-5)
    assert min(m.std() for m in theirs) > 0.05                   # maps with something to compare
    assert np.abs(ours.maps - theirs).max() <= ATOL


def test_eigencam_needs_no_target(detector):
    fmt, net, path, x = detector
    maps = Explainer(str(path), "backbone", cache=False).explain(x, method="eigencam").maps
    with torch.no_grad():
        outputs = []
        handle = net.backbone.register_forward_hook(lambda m, i, o: outputs.append(o) and None)
        net(torch.from_numpy(x))
        handle.remove()
    theirs = torch_oracle.final_maps([torch_oracle.layer_map("eigencam", outputs[0].numpy())], SIZE)
    assert np.abs(maps - theirs).max() <= ATOL


# ---------------------------------------------------------------- command line

def _photo(tmp_path, size=(96, 128)):
    import cv2
    from skimage import data
    image = cv2.resize(data.astronaut(), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path, image


def _cli(*args):
    from click.testing import CliRunner

    from onnxcam.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_box_picks_the_prediction_and_draws_it(detector, tmp_path):
    fmt, net, path, _ = detector
    photo, image = _photo(tmp_path)
    from onnxcam.preprocess import Preprocessing
    x = Preprocessing(size=SIZE).apply(image)[None]
    raw = net(torch.from_numpy(x)).detach().numpy()[0]
    boxes, classes = detection.decode(raw, fmt)
    a = int(np.argsort(-classes.max(1))[5])                      # some prediction, not the best
    sx, sy = image.shape[1] / SIZE[1], image.shape[0] / SIZE[0]
    given = boxes[a] * [sx, sy, sx, sy] + [0.3, -0.2, 0.1, 0.2]   # in image pixels, slightly off
    out = _cli("explain", path, photo, "--node", "backbone", "--box", ",".join(f"{v:.3f}" for v in given),
               "--out", tmp_path / "out", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)["results"][0]
    assert result["detection"]["prediction"] == a
    assert result["class"] == int(classes[a].argmax()) == result["detection"]["class"]
    np.testing.assert_allclose(result["detection"]["box"], boxes[a] * [sx, sy, sx, sy], atol=0.01)
    import cv2
    picture = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "astronaut_gradcam.png")), cv2.COLOR_BGR2RGB)
    assert picture.shape == image.shape
    x1, y1, x2, y2 = (int(round(v)) for v in np.clip(boxes[a] * [sx, sy, sx, sy], 0, [127, 95, 127, 95]))
    edge = picture[min(max(y2, 0), 95), x1 + 1:x2]                 # the bottom edge is drawn in green
    assert edge.size and (edge[:, 1] >= 150).mean() > 0.8 and (edge[:, 0] < 80).mean() > 0.8
    # the default (best detection) and --detection 1 pick other predictions
    best = json.loads(_cli("explain", path, photo, "--node", "backbone", "--out", tmp_path / "o2", "--json",
                           "--overwrite").stdout)["results"][0]["detection"]
    assert best["prediction"] == detection.choose(raw, fmt).prediction
    second = json.loads(_cli("explain", path, photo, "--node", "backbone", "--detection", "1", "--out",
                             tmp_path / "o3", "--json").stdout)["results"][0]["detection"]
    assert second["prediction"] == detection.choose(raw, fmt, index=1).prediction != best["prediction"]


def test_cli_eigencam_and_errors(detector, tmp_path):
    fmt, _, path, _ = detector
    photo, _ = _photo(tmp_path)
    out = _cli("explain", path, photo, "--node", "backbone", "--method", "eigencam", "--out", tmp_path / "e", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)["results"][0]
    assert result["detection"] is None and result["score"] is None
    bad = _cli("explain", path, photo, "--node", "backbone", "--detection", "500", "--out", tmp_path / "b")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --detection 500 asks for detection #500")
    bad = _cli("explain", path, photo, "--node", "backbone", "--box", "10,10,5,20", "--out", tmp_path / "b")
    assert bad.stderr == "error: --box '10,10,5,20' must be X1,Y1,X2,Y2 in image pixels with X2 > X1 and Y2 > Y1\n"


def test_nms_inside_the_graph_is_stated(tmp_path):
    """A yolov8 head followed by NonMaxSuppression, its selected indices as the first output."""
    import onnx
    from onnx import TensorProto, helper
    net = TinyYolo("yolov8").eval()
    path = export_legacy(net, torch.zeros(1, 3, *SIZE), tmp_path / "raw.onnx")
    proto = onnx.load(str(path))
    g = proto.graph
    raw = g.output[0].name
    g.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), n) for v, n in
                          (([0], "s0"), ([4], "s4"), ([1 << 30], "big"), ([1], "ax"), (10, "maxout"))])
    g.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.float32), n) for v, n in
                          ((0.45, "iou"), (0.25, "thr"))])
    g.node.extend([
        helper.make_node("Slice", [raw, "s0", "s4", "ax"], ["xywh"]),
        helper.make_node("Transpose", ["xywh"], ["boxes"], perm=[0, 2, 1]),
        helper.make_node("Slice", [raw, "s4", "big", "ax"], ["scores"]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "maxout", "iou", "thr"], ["selected"],
                         center_point_box=1, name="nms")])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3]),
                     helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [None, None, 4])])
    nms_path = tmp_path / "nms.onnx"
    onnx.save(proto, str(nms_path))
    photo, _ = _photo(tmp_path)
    out = _cli("explain", nms_path, photo, "--node", "backbone", "--out", tmp_path / "n")
    assert out.exit_code == 1
    assert out.stderr == "error: " + detection.nms_inside_message("nms") + "\n"
    assert not (tmp_path / "n" / "astronaut_gradcam.png").exists()
    ok = _cli("explain", nms_path, photo, "--node", "backbone", "--method", "eigencam", "--out", tmp_path / "n")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "n" / "astronaut_eigencam.png").exists()
