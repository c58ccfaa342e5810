"""The Ray engine against the single-process run it must reproduce: same PNG bytes, maps within 1e-6,
same summaries; a worker killed mid-run, a corrupt input and a rerun behave as in one process.

A local Ray with 2 CPUs is started once for the module (as a user's laptop would run it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxcam[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'onnxcam[ray]')")
pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow (pip install 'onnxcam[ray]')")

from click.testing import CliRunner  # noqa: E402

import shapes_data  # noqa: E402
from onnxcam import Explainer  # noqa: E402
from onnxcam.cli import main  # noqa: E402
from onnxcam.detection_files import file_runner  # noqa: E402
from onnxcam.distributed import explain_dataset  # noqa: E402
from onnxcam.model import load_model  # noqa: E402
from onnxcam.preprocess import Preprocessing  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "models" / "shapes_cnn.onnx"
YOLO = ROOT / "models" / "shapes_yolo.onnx"          # a YOLOv8-style detector: (N, 4+5, 80) raw head
# measured: the two engines' maps agree exactly (0.0) on both models; the bound leaves room for an
# ONNX Runtime that picks another kernel for another batch composition
MAP_TOL = 1e-6


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _write(folder: Path, images) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rgb in enumerate(images):
        path = folder / f"img{i:03d}.png"
        assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shapes_inputs(tmp_path_factory) -> list[Path]:
    images, _, _ = shapes_data.make_dataset(64, seed=14)
    return _write(tmp_path_factory.mktemp("shapes_in"), images)


def _options(model):
    loaded = load_model(model)
    pre = Preprocessing.from_metadata(loaded.preprocess, loaded.input.shape)
    return loaded, pre, dict(layout=pre.layout, input_shape=pre.probe_shape(loaded.input.shape))


def _single_process(model, paths, out, methods, detection=None, **file_options):
    loaded, pre, explainer_options = _options(model)
    runner = file_runner(Explainer(loaded, ["auto"], **explainer_options), pre, out, methods, detection,
                         **file_options)
    return [r.summary() for r in runner.run(paths)]


def _ray(model, paths, out, methods, **options):
    loaded, pre, explainer_options = _options(model)
    return explain_dataset(loaded, paths, out, methods=methods, preprocessing=pre,
                           explainer_options=explainer_options, **options)


def _same_outputs(reference: list[dict], run, ref_dir: Path, out_dir: Path):
    strip = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "outputs")}  # noqa: E731
    key = lambda s: (s["input"], s["rank"], s["method"])  # noqa: E731
    assert [strip(s) for s in sorted(run.results, key=key)] == [strip(s) for s in sorted(reference, key=key)]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
    worst = 0.0
    for ref in sorted(ref_dir.iterdir()):
        got = out_dir / ref.name
        if ref.suffix == ".png":
            assert got.read_bytes() == ref.read_bytes(), ref.name
        else:
            worst = max(worst, float(np.abs(np.load(got) - np.load(ref)).max()))
    assert worst <= MAP_TOL
    return worst


def test_shapes_same_as_single_process_corrupt_input_skipped_and_rerun(local_ray, shapes_inputs, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    paths = shapes_inputs[:32] + [bad] + shapes_inputs[32:]
    reference = _single_process(SHAPES, shapes_inputs, tmp_path / "one", ["gradcam"], save_npy=True,
                                batch_size=8)
    run = _ray(SHAPES, paths, tmp_path / "ray", ["gradcam"], save_npy=True, batch_size=8, workers=2)
    assert [f["input"] for f in run.failed] == [str(bad)]
    assert "not a readable image" in run.failed[0]["error"]
    assert run.skipped == 0 and len(run.results) == 64
    _same_outputs(reference, run, tmp_path / "one", tmp_path / "ray")

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()}
    again = _ray(SHAPES, paths, tmp_path / "ray", ["gradcam"], save_npy=True, batch_size=8, workers=2)
    assert again.skipped == 64 and again.results == [] and [f["input"] for f in again.failed] == [str(bad)]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()} == stamps


def test_shapes_every_method_and_top_k(local_ray, shapes_inputs, tmp_path):
    """--method all grids and --top-k files come from the same writer in both engines."""
    paths = shapes_inputs[:12]
    methods = ["gradcam", "layercam", "eigencam", "scorecam"]
    reference = _single_process(SHAPES, paths, tmp_path / "one", methods, top_k=2, save_npy=True)
    run = _ray(SHAPES, paths, tmp_path / "ray", methods, top_k=2, save_npy=True, workers=2, batch_size=5)
    _same_outputs(reference, run, tmp_path / "one", tmp_path / "ray")


def _worker_pids() -> list[int]:
    """Processes of Ray Data's actor pool (their title names the UDF class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"_ExplainWorker" in cmdline and b"MapWorker" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process in /proc")
def test_worker_killed_mid_run_job_completes(local_ray, shapes_inputs, tmp_path):
    """SIGKILL one actor's process (what a crash or the OOM killer does; Ray Data's pool actors are
    unnamed, so there is no handle for ray.kill): Ray restarts it, retries its batch, and every output
    is there and equal to the single-process run's."""
    methods = ["scorecam"]               # slow enough per batch to be killed in the middle
    reference = _single_process(SHAPES, shapes_inputs, tmp_path / "one", methods, batch_size=2)
    out = tmp_path / "ray"
    box = {}
    thread = threading.Thread(target=lambda: box.update(run=_ray(SHAPES, shapes_inputs, out, methods,
                                                                 batch_size=2, workers=2)))
    thread.start()
    killed = None
    deadline = time.time() + 120
    while thread.is_alive() and time.time() < deadline:
        done = len(list(out.glob("*.png"))) if out.exists() else 0
        pids = _worker_pids()
        if 4 <= done < 48 and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = (pids[0], done)
            break
        time.sleep(0.05)
    thread.join(300)
    assert killed is not None, "the run ended before a worker could be killed; make it slower"
    run = box["run"]
    assert run.failed == [] and not list(out.glob("*.tmp"))
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 64 and all(cv2.imread(str(p)) is not None for p in pngs)
    # the batch in flight is explained again by the restarted actor, and reported once
    assert [s["input"] for s in run.results] == [str(p) for p in shapes_inputs]
    _same_outputs(reference, run, tmp_path / "one", out)


def test_parquet_maps_and_summaries(local_ray, shapes_inputs, tmp_path):
    import pyarrow.parquet as pq

    paths = shapes_inputs[:20]
    reference = _single_process(SHAPES, paths, tmp_path / "one", ["gradcam"], save_npy=True)
    run = _ray(SHAPES, paths, tmp_path / "pq", ["gradcam"], fmt="parquet", workers=2)
    assert len(run.results) == 20 and not list((tmp_path / "pq").glob("*.png"))
    table = pq.read_table(tmp_path / "pq").to_pylist()
    assert len(table) == 20
    by_input = {row["input"]: row for row in table}
    for summary in reference:
        row = by_input[summary["input"]]
        assert (row["class"], row["score"], row["error"]) == (summary["class"], summary["score"], None)
        cam = np.asarray(row["map"], np.float32).reshape(row["map_shape"])
        npy = tmp_path / "one" / (Path(summary["input"]).stem + "_gradcam.npy")
        assert np.abs(cam - np.load(npy)).max() <= MAP_TOL
    again = _ray(SHAPES, paths, tmp_path / "pq", ["gradcam"], fmt="parquet", workers=2)
    assert again.skipped == 20 and again.results == []


def test_ray_dataset_of_images(local_ray, shapes_inputs, tmp_path):
    """A ray.data.Dataset with path + image columns (decoded elsewhere) gives the files' outputs."""
    paths = shapes_inputs[:10]
    reference = _single_process(SHAPES, paths, tmp_path / "one", ["gradcam"], save_npy=True)
    rows = [{"path": str(p), "image": cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)} for p in paths]
    dataset = ray.data.from_items(rows)
    run = _ray(SHAPES, dataset, tmp_path / "ray", ["gradcam"], save_npy=True, workers=1)
    _same_outputs(reference, run, tmp_path / "one", tmp_path / "ray")
    assert _ray(SHAPES, dataset, tmp_path / "ray", ["gradcam"], workers=1).skipped == 10


def test_efficientnet_64_photos_same_as_single_process(local_ray, efficientnet_tools, tmp_path):
    """The pretrained EfficientNet-Lite0 on 64 real photos (crops and flips of four skimage photos, of
    different sizes), JPEG and PNG files."""
    model = efficientnet_tools.build(ROOT / ".cache" / "models" / "efficientnet_lite0.onnx")
    photos = list(efficientnet_tools.example_photos().values())
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i in range(64):
        rgb = photos[i % 4]
        h, w = rgb.shape[:2]
        k = i // 4
        crop = rgb[k * h // 64: h - k * h // 48, k * w // 40: w - k * w // 64]
        crop = crop[:, ::-1] if k % 2 else crop
        path = folder / f"photo{i:02d}.{'jpg' if i % 3 else 'png'}"
        assert cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR))
        paths.append(path)
    reference = _single_process(model, paths, tmp_path / "one", ["gradcam"], save_npy=True)
    run = _ray(model, paths, tmp_path / "ray", ["gradcam"], save_npy=True, workers=2)
    assert run.failed == [] and len(run.results) == 64
    _same_outputs(reference, run, tmp_path / "one", tmp_path / "ray")


def test_cli_engine_ray_json_matches_local(local_ray, shapes_inputs, tmp_path):
    """Same JSON and the same per-input error lines as the local engine, with an unreadable input
    among the others; both exit 1 after explaining the rest."""
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    paths = [str(p) for p in shapes_inputs[:6]] + [str(bad)]
    runner = CliRunner()
    local = runner.invoke(main, ["explain", str(SHAPES), *paths, "--out", str(tmp_path / "a"), "--json"])
    on_ray = runner.invoke(main, ["explain", str(SHAPES), *paths, "--out", str(tmp_path / "b"), "--json",
                                  "--engine", "ray", "--workers", "2"])
    assert local.exit_code == 1 and on_ray.exit_code == 1, on_ray.output
    errors = lambda r: r.stderr.splitlines()[:-1]  # noqa: E731  (the last line: the count and advice)
    assert errors(on_ray) == errors(local) and len(errors(local)) == 1 and str(bad) in errors(local)[0]
    assert on_ray.stderr.splitlines()[-1].startswith("error: 1 of 7 input(s) could not be read")
    a, b = json.loads(local.stdout), json.loads(on_ray.stdout)
    strip = lambda r: [{k: v for k, v in s.items() if k not in ("seconds", "outputs")} for s in r]  # noqa: E731
    assert strip(a.pop("results")) == strip(b.pop("results")) and a == b


def test_cli_engine_ray_flags_need_the_engine(tmp_path, shapes_inputs):
    result = CliRunner().invoke(main, ["explain", str(SHAPES), str(shapes_inputs[0]), "--workers", "2",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 1 and result.output.strip().startswith("error: ")
    assert "--engine ray" in result.output


def test_cli_without_ray_names_the_extra(tmp_path, shapes_inputs):
    """In an environment without Ray (simulated by making `import ray` fail in a fresh interpreter)."""
    code = ("import sys; sys.modules['ray'] = None; from onnxcam.cli import main; "
            f"main(['explain', {str(SHAPES)!r}, {str(shapes_inputs[0])!r}, '--engine', 'ray', "
            f"'--out', {str(tmp_path)!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: --engine ray needs Ray Data, which is not installed; pip install 'onnxcam[ray]'"]
    assert not list(tmp_path.iterdir())


DETECTION = dict(fmt="auto", detection_index=None, box=None, confidence=0.25, iou_threshold=0.45)


def test_detector_same_as_single_process(local_ray, shapes_inputs, tmp_path):
    """A detector explains the prediction NMS picks, with its box in the summary and drawn on the
    overlay, in both engines alike (before, the Ray engine scored every anchor's class planes and
    reported no box); EigenCAM's rows name the prediction the other method explained, whose box its
    overlay shows."""
    paths = shapes_inputs[:6]
    methods = ["gradcam", "eigencam"]
    reference = _single_process(YOLO, paths, tmp_path / "one", methods, DETECTION, save_npy=True)
    run = _ray(YOLO, paths, tmp_path / "ray", methods, save_npy=True, workers=2, batch_size=4,
               detection=DETECTION)
    _same_outputs(reference, run, tmp_path / "one", tmp_path / "ray")
    found = [s["detection"] for s in run.results if s["method"] == "gradcam"]
    assert len(found) == 6 and all(len(d["box"]) == 4 for d in found)
    by_input = {s["input"]: s["detection"] for s in run.results if s["method"] == "gradcam"}
    assert all(s["detection"] == by_input[s["input"]] for s in run.results if s["method"] == "eigencam")


def test_detector_parquet_rows_hold_the_box(local_ray, shapes_inputs, tmp_path):
    import pyarrow.parquet as pq

    paths = shapes_inputs[:4]
    picked = dict(DETECTION, detection_index=1)
    reference = {s["input"]: s for s in _single_process(YOLO, paths, tmp_path / "one", ["gradcam"], picked)}
    run = _ray(YOLO, paths, tmp_path / "pq", ["gradcam"], fmt="parquet", workers=1, detection=picked)
    assert len(run.results) == 4
    for row in pq.read_table(tmp_path / "pq").to_pylist():
        assert row["detection"] == reference[row["input"]]["detection"]
        assert (row["class"], row["score"]) == (reference[row["input"]]["class"], reference[row["input"]]["score"])


def test_cli_detection_flags_reach_the_ray_engine(local_ray, shapes_inputs, tmp_path):
    paths = [str(p) for p in shapes_inputs[:3]]
    common = ["explain", str(YOLO), *paths, "--detection", "1", "--json", "--method", "gradcam,eigencam"]
    local = CliRunner().invoke(main, common + ["--out", str(tmp_path / "one")])
    distributed = CliRunner().invoke(main, common + ["--out", str(tmp_path / "ray"), "--engine", "ray",
                                                     "--workers", "1"])
    assert local.exit_code == 0 and distributed.exit_code == 0, (local.output, distributed.output)
    strip = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "outputs")}  # noqa: E731
    ours, theirs = (json.loads(r.stdout)["results"] for r in (distributed, local))
    assert [strip(s) for s in ours] == [strip(s) for s in theirs]
    assert all(s["detection"]["prediction"] >= 0 for s in ours if s["method"] == "gradcam")
