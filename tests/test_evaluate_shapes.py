"""`onnxcam evaluate` on the project's shapes CNN with the true boxes of a held-out shapes set: every
method's pointing game and loc1 are reported, Grad-CAM's pointing game is high, and it equals the
peak-in-box rate computed independently from the Explainer's maps."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import shapes_data
from onnxcam import Explainer
from onnxcam.cli import main
from onnxcam.methods import METHODS as ALL_METHODS

METHODS = [m for m in ALL_METHODS if m != "legrad"]     # LeGrad needs a vision transformer (test_legrad.py)

MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes_cnn.onnx"
SEED, N = 778, 200           # not a training, validation or recording seed


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    paths, boxes_csv = shapes_data.write_dataset(folder / "images", N, SEED)
    rows_csv = folder / "rows.csv"
    result = CliRunner().invoke(main, ["evaluate", str(MODEL), str(folder / "images"), "--boxes", str(boxes_csv),
                                       "--method", "all", "--metrics", "localisation", "--batch-size", "64",
                                       "--json", "--csv", str(rows_csv)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), list(csv.DictReader(rows_csv.open())), boxes_csv


def test_every_method_reports_pointing_game_and_loc(evaluated):
    summary, rows, _ = evaluated
    assert summary["n"] == N and set(summary["methods"]) == set(METHODS)
    for method, values in summary["methods"].items():
        assert set(values) == {"pointing_game", "energy_pointing_game", "loc1", "loc5"}, method
        assert 0 <= values["loc1"] <= values["loc5"] <= 1 and 0 <= values["energy_pointing_game"] <= 1
    assert summary["methods"]["gradcam"]["pointing_game"] >= 0.9
    assert len(rows) == N * len(METHODS)


def test_loc1_needs_the_right_top_class(evaluated):
    """Five classes: the true class is always in the top 5, so loc5 is "the box hits" and loc1 is that
    and a right top-1 prediction."""
    _, rows, boxes_csv = evaluated
    truth = {r["file"]: shapes_data.CLASS_NAMES.index(r["class"]) for r in csv.DictReader(boxes_csv.open())}
    for r in rows:
        right = int(r["class"]) == truth[Path(r["input"]).name]
        assert float(r["loc1"]) == float(r["loc5"]) * right


def test_gradcam_pointing_game_equals_the_peak_in_box_rate(evaluated):
    summary, _, _ = evaluated
    images, labels, boxes = shapes_data.make_dataset(N, SEED)
    maps = Explainer(str(MODEL), "auto").explain(shapes_data.preprocess(images), "gradcam", targets=labels).maps
    hits = 0
    for cam, (x0, y0, x1, y1) in zip(maps, boxes):
        y, x = np.unravel_index(np.argmax(cam), cam.shape)
        hits += bool(x0 <= x < x1 and y0 <= y < y1)
    assert summary["methods"]["gradcam"]["pointing_game"] == round(hits / N, 6)
