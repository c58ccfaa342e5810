"""The metrics' arithmetic and the box loaders on hand-made maps, boxes and files, with values worked
out by hand."""
import json

import numpy as np
import pytest

from onnxcam import Explainer, OnnxcamError
from onnxcam.evaluate import Evaluator
from onnxcam.evaluate import metrics as m
from onnxcam.evaluate.boxes import class_index, ground_truth, load_boxes
from onnxcam.evaluate.perturb import ALL_BASELINE, DELETION, INSERTION, Job, curve_jobs, perturbed_batch


def test_counts_ranks_and_area():
    assert m.perturbation_counts(10, 4).tolist() == [0, 3, 6, 9, 10]
    counts = m.perturbation_counts(224 * 224, 20)
    assert len(counts) == 21 and counts[1] == 2509 and counts[-1] == 50176
    assert m.position_ranks(np.array([[3.0, 1.0], [3.0, 0.0]])).tolist() == [0, 2, 1, 3]
    assert m.curve_auc(np.array([1.0, 0.5, 0.0]), np.array([0, 0.5, 1.0])) == pytest.approx(0.5)
    assert m.curve_auc(np.array([1.0, 1, 0, 0, 0]), np.array([0, 0.3, 0.6, 0.9, 1.0])) == pytest.approx(0.45)


def test_drop_and_increase():
    p, p_masked = np.array([0.5, 0.2, 0.4]), np.array([0.25, 0.4, 0.4])
    assert m.drops(p, p_masked).tolist() == [0.25 / (0.5 + 1e-7), 0.0, 0.0]
    assert m.average_drop(p, p_masked) == pytest.approx(100 * 0.25 / (0.5 + 1e-7) / 3, rel=1e-12)
    assert m.increase_in_confidence(p, p_masked) == pytest.approx(100 / 3)


def test_perturbed_batch_deletes_and_inserts_the_top_ranked_positions():
    x = np.arange(1, 7, dtype=np.float32).reshape(1, 1, 6)           # values 1..6
    base = np.full_like(x, -1.0)
    ranks = np.array([[5, 0, 3, 1, 4, 2]])                           # position 1 ranks first
    batch = perturbed_batch([Job(0, DELETION, 1, 2), Job(0, INSERTION, 1, 2), Job(0, ALL_BASELINE, 2, 6)],
                            x, base, ranks)
    assert batch[0, 0].tolist() == [1, -1, 3, -1, 5, 6]
    assert batch[1, 0].tolist() == [-1, 2, -1, 4, -1, -1]
    assert batch[2, 0].tolist() == [-1] * 6
    jobs = curve_jobs(2, np.array([0, 2, 4, 6]))
    assert len(jobs) == 2 * (1 + 2 * 2) and jobs[0] == Job(0, ALL_BASELINE, 3, 6)


def test_pointing_game():
    cam = np.zeros((6, 8))
    cam[2, 5] = 1.0
    assert m.pointing_hit(cam, [(5, 2, 6, 3)])
    assert not m.pointing_hit(cam, [(0, 0, 5, 2)])                  # x2 = 5 leaves column 5 out
    assert not m.pointing_hit(cam, [(5, 0, 8, 2)])                  # row 2's centre 2.5 is not < 2
    assert m.pointing_hit(cam, [(0, 0, 1, 1), (4.6, 2.4, 5.6, 2.6)])    # any box; centres count
    assert not m.pointing_hit(np.zeros((6, 8)), [(0, 0, 8, 6)])      # an all-zero map points nowhere


def test_energy_pointing_game():
    cam = np.zeros((6, 8))
    cam[1, 1], cam[4, 6], cam[0, 7] = 2.0, 1.0, 1.0
    assert m.energy_share(cam, [(0, 0, 3, 3)]) == 0.5
    assert m.energy_share(cam, [(0, 0, 3, 3), (6, 4, 8, 6)]) == 0.75
    assert m.energy_share(cam, [(0, 0, 3, 3), (1, 1, 2, 2)]) == 0.5   # overlaps count once
    assert m.energy_share(np.zeros((6, 8)), [(0, 0, 8, 6)]) == 0.0


def test_largest_component_box_and_iou():
    cam = np.zeros((10, 12), np.float32)
    cam[2:5, 3:7] = 1.0            # area 12: the largest component, box (3, 2, 7, 5)
    cam[7:9, 9:11] = 0.9           # area 4
    cam[0, 0] = 0.1                # under 0.2 * max
    assert m.component_box(cam, 0.2) == (3.0, 2.0, 7.0, 5.0)
    assert m.iou((3, 2, 7, 5), (3, 2, 7, 7)) == 0.6
    assert m.localised(cam, [(3, 2, 11, 5)], 0.2)                    # IoU exactly 0.5 counts
    assert not m.localised(cam, [(3, 2, 11, 6)], 0.2)                # 12 / 32
    assert m.localised(cam, [(0, 0, 1, 1), (3, 2, 7, 7)], 0.2)
    diagonal = np.zeros((5, 5), np.float32)
    diagonal[[1, 2, 3], [1, 2, 3]] = 1.0                              # 8-connected: one component
    assert m.component_box(diagonal, 0.2) == (1.0, 1.0, 4.0, 4.0)
    ties = np.zeros((4, 9), np.float32)
    ties[1:3, 6:8] = ties[1:3, 1:3] = 1.0                             # equal areas: the first label
    assert m.component_box(ties, 0.5) == (1.0, 1.0, 3.0, 3.0)
    assert m.component_box(np.zeros((4, 4)), 0.2) is None


def test_box_files(tmp_path):
    voc = tmp_path / "a.xml"
    voc.write_text("<annotation><filename>cat.jpg</filename><object><name>Cat</name><bndbox><xmin>11</xmin>"
                   "<ymin>21</ymin><xmax>40</xmax><ymax>60</ymax></bndbox></object></annotation>")
    assert load_boxes(voc) == {"cat.jpg": [("Cat", (10.0, 20.0, 40.0, 60.0))]}
    assert load_boxes(tmp_path) == {"cat.jpg": [("Cat", (10.0, 20.0, 40.0, 60.0))]}    # folder of XML
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "dir/cat.jpg"}, {"id": 8, "file_name": "x.png"}],
                                "categories": [{"id": 3, "name": "cat"}],
                                "annotations": [{"image_id": 7, "category_id": 3, "bbox": [10, 20, 30, 40]}]}))
    assert load_boxes(coco) == {"cat.jpg": [("cat", (10.0, 20.0, 40.0, 60.0))], "x.png": []}
    table = tmp_path / "b.csv"
    table.write_text("file,x1,y1,x2,y2,class\nsub/cat.jpg,10,20,40,60,1\ncat.jpg,0,0,5,5,dog\n")
    assert load_boxes(table) == {"cat.jpg": [("1", (10.0, 20.0, 40.0, 60.0)), ("dog", (0.0, 0.0, 5.0, 5.0))]}
    truth = ground_truth(load_boxes(table)["cat.jpg"], ["cat", "Dog"], 3, (100, 200), (50, 50))
    assert sorted(truth.boxes) == [1]
    assert truth.boxes[1].tolist() == [[2.5, 10.0, 10.0, 30.0], [0.0, 0.0, 1.25, 2.5]]
    assert class_index("CAT", ["cat", "dog"], 2) == 0 and class_index("1", None, 2) == 1


@pytest.mark.parametrize("name,text,fragment", [
    ("b.csv", "cat.jpg,1,2,3\n", "expected 6 columns"),
    ("b.csv", "cat.jpg,1,2,one,4,0\n", "is not a number"),
    ("b.csv", "cat.jpg,5,2,5,4,0\n", "is empty"),
    ("b.json", "{\"images\": []}", "is not COCO JSON"),
    ("b.xml", "<annotation><object><name>x</name></object></annotation>", "needs <name> and <bndbox>"),
    ("b.txt", "", "unknown format"),
])
def test_bad_box_files(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(OnnxcamError, match=fragment):
        load_boxes(path)
    with pytest.raises(OnnxcamError, match="neither a class index"):
        class_index("zebra", ["cat"], 1)
    with pytest.raises(OnnxcamError, match="out of range"):
        class_index("4", ["cat"], 1)


class CountingExplainer(Explainer):
    """The real Explainer, recording the batch size of every forward run."""

    def forward(self, x):
        self.batches.append(len(x))
        return super().forward(x)


def test_batches_bound_memory_and_passes_are_counted(tmp_path):
    import onnx
    from tiny_models import tiny_classifier
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(size=8), str(path))
    explainer = CountingExplainer(str(path), "/features/relu/Relu")
    explainer.batches = []
    evaluator = Evaluator(explainer, steps=20, batch_size=7)
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    results = evaluator.evaluate(x, "gradcam")
    per_input = evaluator.forward_passes_per_input(64)
    # 64 positions in 20 steps: 16 intervals of 4, K = 17 points; 1 masked input for AD / IC, the
    # all-baseline input, and one deletion and one insertion input for each of the 15 inner points
    assert len(m.perturbation_counts(64, 20)) == 17 and per_input == 1 + 1 + 2 * 15
    assert max(explainer.batches) <= 7 and sum(explainer.batches) == 5 * per_input == evaluator.forward_rows
    for r in results:                          # the curves end where they must
        assert r.deletion[0] == r.insertion[-1] == pytest.approx(r.probability)
        assert r.deletion[-1] == r.insertion[0]


def test_loc1_and_loc5_follow_the_rank_of_the_true_class(tmp_path):
    """The ground-truth box is the map's own component box, so the box always hits: loc1 then says
    whether the class is top-1, loc5 whether it is in the top 5."""
    import onnx
    from onnxcam.evaluate import GroundTruth
    from tiny_models import tiny_classifier
    path = tmp_path / "tiny6.onnx"
    onnx.save(tiny_classifier(size=8, classes=7, channels=6, seed=3), str(path))
    explainer = Explainer(str(path), "/features/relu/Relu")
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    order = np.argsort(-explainer.forward(x)[0][0], kind="stable")
    evaluator = Evaluator(explainer, metrics=["loc1", "loc5", "pointing_game"], loc_threshold=0.2)
    for rank, (loc1, loc5) in {0: (1.0, 1.0), 1: (0.0, 1.0), 4: (0.0, 1.0), 5: (0.0, 0.0)}.items():
        c = int(order[rank])
        cam = explainer.explain(x, "gradcam", targets=[c]).maps[0]
        box = m.component_box(cam, 0.2)
        assert box is not None
        result = evaluator.evaluate(x, "gradcam", [GroundTruth({c: np.array([box])})])[0]
        assert (result.values["loc1"], result.values["loc5"]) == (loc1, loc5), rank
        assert result.values["pointing_game"] == 1.0


def test_channels_last_model_scores_like_its_channels_first_twin(tmp_path):
    """A tf2onnx-style NHWC model and its NCHW twin (same weights): same maps, same metrics."""
    import onnx
    from tiny_models import keras_mobilenet_like
    x = np.random.default_rng(4).normal(size=(3, 3, 32, 32)).astype(np.float32)
    values = {}
    for nhwc in (True, False):
        path = tmp_path / f"m{nhwc}.onnx"
        onnx.save(keras_mobilenet_like(nhwc=nhwc), str(path))
        explainer = Explainer(str(path), "auto", layout="NHWC" if nhwc else "NCHW")
        feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x
        results = Evaluator(explainer, steps=8, baseline="blur", batch_size=5).evaluate(feed, "gradcam")
        values[nhwc] = np.array([[r.values[k] for k in sorted(r.values)] for r in results])
    assert np.abs(values[True] - values[False]).max() < 5e-6 and np.abs(values[True]).max() > 0   # measured 4e-7
