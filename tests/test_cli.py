"""The command line on a tiny model: outputs written, summaries printed, and every bad input refused
with one line, a non-zero exit code and no partial output."""
import json

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcam.cli import main
from tiny_models import tiny_classifier


@pytest.fixture()
def files(tmp_path):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(size=8), str(model_path))
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8))
        images.append(path)
    return model_path, images, tmp_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, fragment):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_explain_writes_one_overlay_per_input_at_original_size(files):
    model, images, tmp = files
    out = tmp / "out"
    before = [p.read_bytes() for p in images]
    result = invoke("explain", model, *images, "--node", "/features/relu/Relu", "--out", out, "--npy")
    assert result.exit_code == 0, result.output
    for image in images:
        picture = cv2.imread(str(out / f"{image.stem}_gradcam.png"))
        assert picture.shape == cv2.imread(str(image)).shape
        assert np.load(out / f"{image.stem}_gradcam.npy").shape == (8, 8)
        assert f"{image}: class " in result.output
    assert [p.read_bytes() for p in images] == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_json_summary_and_class_names(files):
    model, images, tmp = files
    result = invoke("explain", model, images[0], "--json", "--out", tmp / "o", "--target", "class2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    entry = summary["results"][0]
    assert entry["class"] == 2 and entry["class_name"] == "class2" and entry["method"] == "gradcam"


def test_top_k_writes_one_map_per_class(files):
    model, images, tmp = files
    result = invoke("explain", model, images[0], "--top-k", "2", "--out", tmp / "o", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)["results"]
    assert [e["rank"] for e in entries] == [1, 2] and entries[0]["class"] != entries[1]["class"]
    assert (tmp / "o" / "img0_gradcam_top2.png").exists()


def test_method_all_writes_a_grid(files):
    model, images, tmp = files
    result = invoke("explain", model, images[0], "--method", "all", "--out", tmp / "o", "--json")
    assert result.exit_code == 0, result.output
    methods = {e["method"] for e in json.loads(result.output)["results"]}
    assert {"cam", "gradcam", "scorecam", "eigencam", "layercam"} <= methods
    assert cv2.imread(str(tmp / "o" / "img0_all.png")) is not None


def test_folder_input_skips_done_work_unless_overwrite(files):
    model, images, tmp = files
    assert invoke("explain", model, tmp, "--out", tmp / "o").exit_code == 0
    again = invoke("explain", model, tmp, "--out", tmp / "o")
    assert "skipped 3 input(s)" in again.output


def test_nodes_table_marks_the_default(files):
    model, _, _ = files
    result = invoke("nodes", model)
    assert result.exit_code == 0, result.output
    assert "/features/relu/Relu" in result.output and "*" in result.output


def test_missing_model(files):
    _, images, tmp = files
    one_line_error(invoke("explain", tmp / "nope.onnx", images[0]), "does not exist")


def test_not_an_onnx_file(files):
    _, images, tmp = files
    fake = tmp / "fake.onnx"
    fake.write_text("this is not a model")
    one_line_error(invoke("explain", fake, images[0], "--out", tmp / "o"), "not")
    assert not (tmp / "o").exists() or not list((tmp / "o").iterdir())


def test_missing_external_data(files):
    _, images, tmp = files
    path = tmp / "external.onnx"
    onnx.save_model(tiny_classifier(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    (tmp / "external.onnx.data").unlink()
    one_line_error(invoke("explain", path, images[0]), "missing")


def test_non_image_input(files):
    model, _, tmp = files
    bad = tmp / "notes.png"
    bad.write_text("hello")
    one_line_error(invoke("explain", model, bad, "--out", tmp / "o"), "not a readable image")
    assert not list((tmp / "o").glob("*.png"))


def test_missing_input(files):
    model, _, tmp = files
    one_line_error(invoke("explain", model, tmp / "missing.png"), "does not exist")


def test_unknown_node_lists_close_matches(files):
    model, images, _ = files
    one_line_error(invoke("explain", model, images[0], "--node", "/features/relu/Relux"), "/features/relu")


def test_non_spatial_node(files):
    model, images, _ = files
    one_line_error(invoke("explain", model, images[0], "--node", "/fc/Gemm"), "no spatial axes")


def test_target_out_of_range(files):
    model, images, tmp = files
    one_line_error(invoke("explain", model, images[0], "--target", "7", "--out", tmp / "o"), "out of range")
    assert not list((tmp / "o").glob("*.png"))


def test_input_size_the_model_cannot_take(files):
    model, images, tmp = files
    one_line_error(invoke("explain", model, images[0], "--size", "9,9", "--out", tmp / "o"), "resize")


def test_output_directory_that_is_a_file(files):
    model, images, tmp = files
    blocker = tmp / "blocker"
    blocker.write_text("x")
    one_line_error(invoke("explain", model, images[0], "--out", blocker), "is a file")
    one_line_error(invoke("explain", model, images[0], "--out", blocker / "sub"), "cannot create")
    assert blocker.read_text() == "x"


def test_output_never_overwrites_an_input(files):
    model, images, tmp = files
    trap = tmp / "img0_gradcam.png"
    cv2.imwrite(str(trap), np.zeros((4, 4, 3), np.uint8))
    before = trap.read_bytes()
    one_line_error(invoke("explain", model, images[0], trap, "--out", tmp, "--overwrite"), "refusing")
    assert trap.read_bytes() == before


def test_top_k_larger_than_class_count(files):
    model, images, tmp = files
    one_line_error(invoke("explain", model, images[0], "--top-k", "5", "--out", tmp / "o"), "larger than")


def test_labels_file_names_the_classes(files):
    model, images, tmp = files
    labels = tmp / "labels.txt"
    labels.write_text("zero\none\ntwo\n")
    result = invoke("explain", model, images[0], "--labels", labels, "--target", "two", "--json",
                    "--out", tmp / "o")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["class_name"] == "two"


def test_target_mask_on_a_segmentation_model(files):
    from tiny_models import tiny_segmenter
    _, images, tmp = files
    seg = tmp / "seg.onnx"
    onnx.save(tiny_segmenter(), str(seg))
    mask = np.zeros((8, 8), np.float32)
    mask[:4] = 1
    np.save(tmp / "mask.npy", mask)
    args = ("explain", seg, images[0], "--size", "8,8", "--out", tmp / "o", "--overwrite", "--json")
    result = invoke(*args, "--target", "1", "--target-mask", tmp / "mask.npy")
    assert result.exit_code == 0, result.output
    np.save(tmp / "bad.npy", np.ones((3, 3), np.float32))
    one_line_error(invoke(*args[:-1], "--target", "1", "--target-mask", tmp / "bad.npy"), "output map is")
    one_line_error(invoke(*args[:-1], "--target-mask", tmp / "mask.npy"), "needs --target")


def test_export_augmented_runs_on_plain_onnxruntime(files):
    import onnxruntime as ort
    model, _, tmp = files
    out = tmp / "augmented.onnx"
    result = invoke("export-augmented", model, "--node", "/features/relu/Relu", "-o", out)
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", "onnxcam_target_weights"]
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    logits, act, grad = session.run(None, {"input": x, "onnxcam_target_weights": np.zeros((2, 3), np.float32)})
    assert act.shape == grad.shape == (2, 4, 8, 8)
    fc_w = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "fc_w"))
    np.testing.assert_allclose(grad[:, :, 0, 0], fc_w[logits.argmax(1)] / 64, rtol=1e-6)
    one_line_error(invoke("export-augmented", model, "-o", model), "refusing to overwrite")


@pytest.mark.parametrize("rank, picture_shape", [(1, (256, 768, 3)), (3, (256, 768, 3))], ids=["1d", "3d"])
def test_npy_signals_and_volumes(tmp_path, rank, picture_shape):
    """1D and 3D inputs come from .npy files: the map is saved as .npy, plus a line plot (1D) or the
    three mid-slices (3D) as PNG."""
    model = tmp_path / f"net{rank}d.onnx"
    onnx.save(tiny_classifier(size=8, rank=rank), str(model))
    sample = np.random.default_rng(rank).normal(size=(3,) + (8,) * rank).astype(np.float32)
    np.save(tmp_path / "sample.npy", sample)
    result = invoke("explain", model, tmp_path / "sample.npy", "--out", tmp_path / "out", "--method", "layercam")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "out" / "sample_layercam.npy").shape == (8,) * rank
    assert cv2.imread(str(tmp_path / "out" / "sample_layercam.png")).shape == picture_shape


def test_npy_of_the_wrong_rank(tmp_path):
    model = tmp_path / "net1d.onnx"
    onnx.save(tiny_classifier(size=8, rank=1), str(model))
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 8), np.float32))
    one_line_error(invoke("explain", model, tmp_path / "bad.npy", "--out", tmp_path / "o"), "rank")
