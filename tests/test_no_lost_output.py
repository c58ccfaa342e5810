"""No lost output: one distinct output per input, resume that checks every file the run writes,
clean-up of what killed runs leave, unreadable inputs reported and skipped, globs filtered like
folders, never a read from a FIFO. Includes a real kill -9 in the middle of a run, then a resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcam.cli import main
from onnxcam.naming import output_keys
from tiny_models import tiny_classifier

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def image(path: Path, seed: int = 0, size=(20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))
    return path


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(size=8), str(path))
    return path


def test_output_keys_rule():
    keys = output_keys([Path("x/pic.png"), Path("y/pic.png"), Path("x/pic.jpg"), Path("z/cat.png"),
                        Path("a/b/dog.png"), Path("a/c/dog.png")])
    assert keys == {Path("x/pic.png"): Path("x/pic_png"), Path("y/pic.png"): Path("y/pic_png"),
                    Path("x/pic.jpg"): Path("pic_jpg"), Path("z/cat.png"): Path("cat"),
                    Path("a/b/dog.png"): Path("b/dog_png"), Path("a/c/dog.png"): Path("c/dog_png")}
    clash = output_keys([Path("a.png"), Path("a.jpg"), Path("a_png.bmp")])
    assert len(set(clash.values())) == 3


def test_same_stems_in_different_folders_all_survive(tmp_path, model):
    inputs = [image(tmp_path / "x" / "pic.png", 1), image(tmp_path / "y" / "pic.png", 2),
              image(tmp_path / "x" / "pic.jpg", 3)]
    out = tmp_path / "out"
    result = invoke("explain", model, *inputs, "--out", out, "--npy")
    assert result.exit_code == 0, result.output
    pngs = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert pngs == ["pic_jpg_gradcam.png", "x/pic_png_gradcam.png", "y/pic_png_gradcam.png"]
    maps = [np.load(p) for p in sorted(out.rglob("*.npy"))]
    assert len(maps) == 3 and not np.array_equal(maps[1], maps[2])
    again = invoke("explain", model, *inputs, "--out", out, "--npy")
    assert "skipped 3" in again.output


def test_resume_rewrites_a_missing_npy(tmp_path, model):
    inputs = [image(tmp_path / f"img{i}.png", i) for i in range(3)]
    out = tmp_path / "out"
    assert invoke("explain", model, *inputs, "--out", out, "--npy").exit_code == 0
    (out / "img1_gradcam.npy").unlink()          # as if killed between the .npy and the PNG
    result = invoke("explain", model, *inputs, "--out", out, "--npy", "--json")
    assert result.exit_code == 0, result.output
    import json
    payload = json.loads(result.output)
    assert payload["skipped"] == 2 and [r["input"] for r in payload["results"]] == [str(inputs[1])]
    assert (out / "img1_gradcam.npy").exists()


def test_stale_temps_removed_only_ours_and_old(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    old = out / ".img0_gradcam.png.k3j2h1g0.tmp"
    fresh = out / ".img0_gradcam.png.zzzzzzzz.tmp"
    theirs = out / "their_notes.tmp"
    for p in (old, fresh, theirs):
        p.write_bytes(b"partial")
    past = time.time() - 600
    os.utime(old, (past, past))
    os.utime(theirs, (past, past))
    assert invoke("explain", model, image(tmp_path / "img0.png"), "--out", out).exit_code == 0
    assert not old.exists() and fresh.exists() and theirs.exists()


def test_unreadable_files_reported_skipped_and_summarised(tmp_path, model):
    folder = tmp_path / "in"
    good = [image(folder / f"ok{i}.png", i) for i in range(3)]
    (folder / "broken.png").write_bytes(b"not an image")
    np.save(folder / "nan.npy", np.full((3, 8, 8), np.nan, np.float32))
    (folder / "notes.txt").write_text("ignored: not an input suffix")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(model), str(folder), "--out", str(out)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, result.output          # two inputs and the summary
    assert "broken.png" in errors[0] and "nan.npy" in errors[1] and "2 of 5 input(s)" in errors[2]
    assert sorted(p.name for p in out.glob("*.png")) == [f"ok{i}_gradcam.png" for i in range(3)]
    assert "Traceback" not in result.output
    fast = CliRunner().invoke(main, ["explain", str(model), str(folder), "--out", str(tmp_path / "o2"),
                                     "--fail-fast"])
    assert fast.exit_code == 1
    assert [line for line in fast.output.splitlines() if line.strip()] == [errors[0]]


def test_glob_filters_like_a_folder(tmp_path, model):
    folder = tmp_path / "in"
    image(folder / "a.png")
    (folder / "readme.txt").write_text("text")
    (folder / "sub").mkdir()
    result = invoke("explain", model, str(folder / "*"), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_gradcam.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_never_hangs(tmp_path, model):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    image(tmp_path / "a.png")
    code = f"""
import sys
from onnxcam.cli import main
main(["explain", {str(model)!r}, {str(fifo)!r}, "--out", {str(tmp_path / 'o')!r}])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr
    # in a folder or a glob a FIFO is not even listed
    result = invoke("explain", model, tmp_path, "--out", tmp_path / "o")
    assert result.exit_code == 0 and "pipe" not in result.output


def test_kill_minus_9_then_resume(tmp_path, model):
    inputs = [image(tmp_path / "in" / f"img{i:02d}.png", i, size=(400, 600)) for i in range(24)]
    out = tmp_path / "out"
    code = f"""
import sys
from onnxcam.cli import main
main(["explain", {str(model)!r}, {str(tmp_path / 'in')!r}, "--out", {str(out)!r}, "--npy",
      "--batch-size", "1", "--method", "all"])
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("*_all.png")))
    assert 0 < done_before < len(inputs), "the kill must land in the middle of the run"
    time.sleep(2.5)   # temporaries of the killed run are now older than the resumed run's grace
    result = invoke("explain", model, tmp_path / "in", "--out", out, "--npy", "--method", "all")
    assert result.exit_code == 0, result.output
    methods = {p.name[len("img23_"):] for p in out.glob("img23_*.npy")}   # written by the resumed run
    assert len(methods) >= 5
    for path in inputs:
        assert cv2.imread(str(out / f"{path.stem}_all.png")) is not None, path
        for m in methods:
            cam = np.load(out / f"{path.stem}_{m}")
            assert cam.shape == (8, 8) and np.isfinite(cam).all()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
