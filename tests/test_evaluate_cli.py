"""`onnxcam evaluate` on a tiny model: the table, the --json schema, --csv rows, --plots pictures, and
bad inputs refused with one line and no output file."""
import csv
import json

import cv2
import numpy as np
import onnx
import pytest

from tiny_models import tiny_classifier
from user_path import run_cli

FAITHFULNESS = ["average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc"]


@pytest.fixture()
def files(tmp_path):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(size=8), str(model_path))
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (16, 24, 3), dtype=np.uint8))
        images.append(path)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,x1,y1,x2,y2,class\nimg0.png,0,0,12,8,class1\nimg1.png,6,4,24,16,0\n")
    return model_path, images, boxes, tmp_path


def invoke(*args):
    return run_cli("evaluate", *args)      # stdout and stderr apart with every click version


def one_line_error(result, fragment):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "", result.stdout
    assert fragment in lines[0], lines[0]


def test_table_has_a_row_per_method(files):
    model, images, _, _ = files
    result = invoke(model, *images, "--method", "gradcam", "--method", "layercam", "--steps", "4")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["method", "AD", "%", "IC", "%", "deletion", "insertion"]
    assert [line.split()[0] for line in lines[1:3]] == ["gradcam", "layercam"]
    assert lines[3] == "3 inputs"


def test_json_csv_and_plots(files):
    model, images, boxes, tmp = files
    rows_csv, plots = tmp / "rows.csv", tmp / "plots"
    result = invoke(model, *images, "--method", "gradcam", "--method", "scorecam", "--boxes", boxes,
                    "--json", "--csv", rows_csv, "--plots", plots, "--steps", "5", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert "note: 1 of 3 inputs have no box" in result.stderr
    assert set(summary) == {"model", "n", "methods"} and summary["n"] == 3 and summary["model"] == str(model)
    assert list(summary["methods"]) == ["gradcam", "scorecam"]
    for values in summary["methods"].values():
        assert list(values) == FAITHFULNESS + ["pointing_game", "energy_pointing_game", "loc1", "loc5"]
    rows = list(csv.DictReader(rows_csv.open()))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"gradcam", "scorecam"}
    for method, values in summary["methods"].items():
        mine = [r for r in rows if r["method"] == method]
        for name in FAITHFULNESS:              # the summary is the mean of the per-input rows
            assert values[name] == pytest.approx(np.mean([float(r[name]) for r in mine]), abs=1e-5)
        with_boxes = [r for r in mine if r["pointing_game"]]
        assert len(with_boxes) == 2            # img2 has no box
        assert values["loc5"] == pytest.approx(np.mean([float(r["loc5"]) for r in with_boxes]), abs=1e-6)
    for method in ("gradcam", "scorecam"):
        picture = cv2.imread(str(plots / f"{method}_curves.png"))
        assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 2 * picture.shape[0]


def test_metrics_subset(files):
    model, images, _, _ = files
    result = invoke(model, *images, "--metrics", "ad,insertion", "--json")
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["methods"]["gradcam"]) == ["average_drop", "insertion_auc"]


@pytest.mark.parametrize("extra,fragment", [
    (["--metrics", "speed"], "unknown metric 'speed'"),
    (["--metrics", "pointing"], "need ground-truth boxes; pass --boxes"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--loc-threshold", "1.5", "--boxes", "BOXES"], "--loc-threshold 1.5 must be in (0, 1]"),
    (["--method", "magic"], "magic"),
    (["--boxes", "missing.csv"], "does not exist"),
    (["--csv", "INPUT"], "refusing to overwrite input file"),
])
def test_bad_inputs_are_one_line_errors(files, extra, fragment):
    model, images, boxes, tmp = files
    extra = [str(boxes) if e == "BOXES" else str(images[0]) if e == "INPUT" else e for e in extra]
    before = images[0].read_bytes()
    result = invoke(model, *images, *extra)
    one_line_error(result, fragment)
    assert images[0].read_bytes() == before


def test_boxes_matching_no_input(files):
    model, images, _, tmp = files
    other = tmp / "other.csv"
    other.write_text("elsewhere.png,0,0,4,4,0\n")
    one_line_error(invoke(model, *images, "--boxes", other), "no input matches a file name in --boxes")
    bad_class = tmp / "bad.csv"
    bad_class.write_text("img0.png,0,0,4,4,zebra\n")
    one_line_error(invoke(model, *images, "--boxes", bad_class), "class 'zebra' is neither")
