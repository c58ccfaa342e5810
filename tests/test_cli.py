"""The command line on a tiny model: outputs written, summaries printed, and every bad input refused
with one line, a non-zero exit code and no partial output."""
import json

import cv2
import numpy as np
import onnx
import pytest
from tiny_models import tiny_classifier
from user_path import assert_error, run_cli


@pytest.fixture()
def neutral(tmp_path_factory):
    """A fresh folder whose path holds no word of any message (pytest's tmp_path holds the test name)."""
    return tmp_path_factory.mktemp("c")


@pytest.fixture()
def files(neutral):
    tmp_path = neutral
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
    return run_cli(*args)


def one_line_error(result, message):
    """The whole message: exit code 1, stdout empty, stderr exactly ``error: <message>``."""
    assert_error(result, message)


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
        assert f"{image}: class " in result.stdout
    assert [p.read_bytes() for p in images] == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_json_summary_and_class_names(files):
    model, images, tmp = files
    result = invoke("explain", model, images[0], "--json", "--out", tmp / "o", "--target", "class2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    entry = summary["results"][0]
    assert entry["class"] == 2 and entry["class_name"] == "class2" and entry["method"] == "gradcam"


def test_top_k_writes_one_map_per_class(files):
    """(with ``-o``, the short form of ``--out``, as in export-augmented)"""
    model, images, tmp = files
    result = invoke("explain", model, images[0], "--top-k", "2", "-o", tmp / "o", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)["results"]
    assert [e["rank"] for e in entries] == [1, 2] and entries[0]["class"] != entries[1]["class"]
    assert (tmp / "o" / "img0_gradcam_top2.png").exists()


def test_method_all_writes_a_grid(files):
    model, images, tmp = files
    result = invoke("explain", model, images[0], "--method", "all", "--out", tmp / "o", "--json")
    assert result.exit_code == 0, result.output
    methods = {e["method"] for e in json.loads(result.stdout)["results"]}
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
    assert "/features/relu/Relu" in result.stdout and "*" in result.stdout


def test_missing_model(files):
    _, images, tmp = files
    one_line_error(invoke("explain", tmp / "nope.onnx", images[0]),
                   f"model file {tmp / 'nope.onnx'} does not exist; check the path")


def test_not_an_onnx_file(files):
    _, images, tmp = files
    fake = tmp / "fake.onnx"
    fake.write_text("this is not a model")
    one_line_error(invoke("explain", fake, images[0], "--out", tmp / "o"),
                   f"{fake} is not a readable ONNX model (DecodeError); pass a .onnx file exported from your framework")
    assert not (tmp / "o").exists() or not list((tmp / "o").iterdir())


def test_missing_external_data(files):
    _, images, tmp = files
    path = tmp / "external.onnx"
    onnx.save_model(tiny_classifier(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    (tmp / "external.onnx.data").unlink()
    one_line_error(invoke("explain", path, images[0]),
                   f"{path} keeps its weights in the external file {tmp / 'external.onnx.data'}, which is missing; "
                   "copy it next to the model")


def test_non_image_input(files):
    model, _, tmp = files
    bad = tmp / "notes.png"
    bad.write_text("hello")
    one_line_error(invoke("explain", model, bad, "--out", tmp / "o"),
                   f"input {bad} is not a readable image (PNG, JPEG, BMP, TIFF, WebP); pass an image file, or a .npy "
                   "array for non-image models")
    assert not list((tmp / "o").glob("*.png"))


def test_missing_input(files):
    model, _, tmp = files
    one_line_error(invoke("explain", model, tmp / "missing.png"),
                   f"input {tmp / 'missing.png'} does not exist; check the path")


def test_unknown_node_lists_close_matches(files):
    model, images, _ = files
    one_line_error(invoke("explain", model, images[0], "--node", "/features/relu/Relux"),
                   "no node, output tensor or module scope matches '/features/relu/Relux'; closest: "
                   "/features/relu/Relu, features/relu, features, /features/conv/Conv, features/conv "
                   "(list them with `onnxcam nodes MODEL`, or use --node auto)")
    # a misspelling that shares no prefix with the answer: the suggestion cannot be the echoed spec
    one_line_error(invoke("explain", model, images[0], "--node", "featurs/rleu"),
                   "no node, output tensor or module scope matches 'featurs/rleu'; closest: features/relu, "
                   "/features/relu/Relu, features, features/conv, /features/conv/Conv (list them with `onnxcam nodes MODEL`, or use --node auto)")


def test_non_spatial_node(files):
    model, images, _ = files
    one_line_error(invoke("explain", model, images[0], "--node", "/fc/Gemm"),
                   "node /fc/Gemm outputs shape (?, 3), which has no spatial axes; pick a convolutional layer "
                   "(see `onnxcam nodes MODEL`)")


def test_target_out_of_range(files):
    model, images, tmp = files
    one_line_error(invoke("explain", model, images[0], "--target", "7", "--out", tmp / "o"),
                   "target class 7 is out of range: the model has 3 classes (0-2)")
    assert not list((tmp / "o").glob("*.png"))


def test_input_size_the_model_cannot_take(files):
    model, images, tmp = files
    one_line_error(invoke("explain", model, images[0], "--size", "9,9", "--out", tmp / "o"),
                   "input has shape (1, 3, 9, 9) but the model takes (N, 3, 8, 8); resize the input (--size) or "
                   "fix --layout")


def test_output_directory_that_is_a_file(files):
    model, images, tmp = files
    blocker = tmp / "blocker"
    blocker.write_text("x")
    one_line_error(invoke("explain", model, images[0], "--out", blocker),
                   f"output directory {blocker} is a file; pass a folder with --out")
    one_line_error(invoke("explain", model, images[0], "--out", blocker / "sub"),
                   f"cannot create output directory {blocker / 'sub'} (Not a directory); pass a writable folder "
                   "with --out")
    assert blocker.read_text() == "x"


def test_output_never_overwrites_an_input(files):
    model, images, tmp = files
    trap = tmp / "img0_gradcam.png"
    cv2.imwrite(str(trap), np.zeros((4, 4, 3), np.uint8))
    before = trap.read_bytes()
    one_line_error(invoke("explain", model, images[0], trap, "--out", tmp, "--overwrite"),
                   f"refusing to overwrite input file {trap}; choose another --out folder")
    assert trap.read_bytes() == before


def test_top_k_larger_than_class_count(files):
    model, images, tmp = files
    one_line_error(invoke("explain", model, images[0], "--top-k", "5", "--out", tmp / "o"),
                   "--top-k 5 is larger than the model's 3 classes")


def test_labels_file_names_the_classes(files):
    model, images, tmp = files
    labels = tmp / "labels.txt"
    labels.write_text("zero\none\ntwo\n")
    result = invoke("explain", model, images[0], "--labels", labels, "--target", "two", "--json",
                    "--out", tmp / "o")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["class_name"] == "two"


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
    one_line_error(invoke(*args[:-1], "--target", "1", "--target-mask", tmp / "bad.npy"),
                   "--target-mask has shape (3, 3) but the model's output map is (8, 8); give a mask of that size")
    one_line_error(invoke(*args[:-1], "--target-mask", tmp / "mask.npy"),
                   "--target-mask needs --target CLASS: the class whose logits the mask sums")


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
    one_line_error(invoke("export-augmented", model, "-o", model),
                   f"refusing to overwrite the input model {model}; choose another -o path")


@pytest.mark.parametrize("rank, picture_shape", [(1, (256, 768, 3)), (3, (256, 768, 3))], ids=["1d", "3d"])
def test_npy_signals_and_volumes(neutral, rank, picture_shape):
    """1D and 3D inputs come from .npy files: the map is saved as .npy, plus a line plot (1D) or the
    three mid-slices (3D) as PNG."""
    tmp_path = neutral
    model = tmp_path / f"net{rank}d.onnx"
    onnx.save(tiny_classifier(size=8, rank=rank), str(model))
    sample = np.random.default_rng(rank).normal(size=(3,) + (8,) * rank).astype(np.float32)
    np.save(tmp_path / "sample.npy", sample)
    result = invoke("explain", model, tmp_path / "sample.npy", "--out", tmp_path / "out", "--method", "layercam")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "out" / "sample_layercam.npy").shape == (8,) * rank
    assert cv2.imread(str(tmp_path / "out" / "sample_layercam.png")).shape == picture_shape


def test_npy_of_the_wrong_rank(neutral):
    tmp_path = neutral
    model = tmp_path / "net1d.onnx"
    onnx.save(tiny_classifier(size=8, rank=1), str(model))
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 8), np.float32))
    one_line_error(invoke("explain", model, tmp_path / "bad.npy", "--out", tmp_path / "o"),
                   f"input {tmp_path / 'bad.npy'} has shape (2, 3, 4, 8); the model takes rank 3 batches, so save "
                   "one sample without the batch axis")


UNWRITABLE_OUT_CHILD = """
import json, sys
from user_path import run_cli
result = run_cli(*sys.argv[1:])
print(json.dumps({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}))
"""


def test_unwritable_output_folder(files):
    """Runs where permissions bind (as root: every capability dropped, see user_path)."""
    from user_path import run_without_privileges
    model, images, tmp = files
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        done = run_without_privileges(UNWRITABLE_OUT_CHILD, "explain", str(model), str(images[0]), "--out",
                                      str(locked))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "code": 1, "stdout": "",
            "stderr": f"error: output directory {locked} is not writable; pass a writable folder with --out\n"}
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
