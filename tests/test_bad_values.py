"""Non-finite inputs and flags are refused with one line; --json output is always valid JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcam import Explainer
from onnxcam.cli import main
from onnxcam.errors import OnnxcamError
from tiny_models import tiny_classifier

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def setup(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(size=8), str(model))
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    return model, img, tmp_path


def one_line(result, fragment):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("values,fragment", [
    (np.full((3, 8, 8), np.nan, np.float32), "NaN or infinite"),
    (np.where(np.eye(8, dtype=bool), np.inf, 0.0)[None].repeat(3, 0).astype(np.float32), "NaN or infinite"),
    (np.full((3, 8, 8), 1e300), "beyond float32"),
    (np.array([["a"] * 8] * 8), "values"),
    (np.zeros((3, 8), dtype=[("x", "f4"), ("y", "i4")]), "values"),
    (np.zeros((3, 8, 8), np.complex64), "values"),
])
def test_bad_npy_inputs(setup, values, fragment):
    model, _, tmp = setup
    path = tmp / "bad.npy"
    np.save(path, values)
    one_line(run("explain", model, path, "--out", tmp / "o"), fragment)
    assert not (tmp / "o").exists() or not list((tmp / "o").iterdir())


@pytest.mark.parametrize("flags,fragment", [
    (["--scale", "nan"], "--scale"), (["--scale", "inf"], "--scale"), (["--mean", "nan,0,0"], "--mean"),
    (["--std", "1,inf,1"], "--std"), (["--alpha", "nan"], "--alpha"), (["--target=--5"], "--target"),
    (["--target", "-1"], "--target"), (["--size", "100000,100000"], "--size"), (["--size", ","], "--size"),
    (["--max-channels", "0"], "--max-channels"), (["--max-pixels", "-1"], "--max-pixels"),
])
def test_bad_flags(setup, flags, fragment):
    model, img, tmp = setup
    one_line(run("explain", model, img, "--out", tmp / "o", *flags), fragment)


def test_api_refuses_non_finite_batches(setup):
    model, _, _ = setup
    x = np.zeros((1, 3, 8, 8), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(OnnxcamError, match="NaN"):
        Explainer(model, cache=False).explain(x)


def test_json_is_valid_even_when_the_model_gives_nan(tmp_path):
    """A model that itself outputs NaN (log of a negative) still gives parseable JSON (score null)."""
    proto = tiny_classifier(size=8, softmax=False)
    g = proto.graph
    last = g.output[0].name
    g.node[-1].output[0] = "pre_nan"
    g.node.extend([onnx.helper.make_node("Sub", ["pre_nan", "pre_nan"], ["zero"]),
                   onnx.helper.make_node("Div", ["zero", "zero"], [last])])
    path = tmp_path / "nan.onnx"
    onnx.save(proto, str(path))
    np.save(tmp_path / "x.npy", np.ones((3, 8, 8), np.float32))
    result = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "x.npy"), "--out",
                                       str(tmp_path / "o"), "--json", "--method", "eigencam"])
    payload = json.loads(result.output)        # strict JSON: NaN would not parse with allow_nan off
    json.dumps(payload, allow_nan=False)
    assert payload["results"][0]["score"] is None


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to another user to be refused a file")
def test_permission_denied_is_one_line(tmp_path):
    secret = tmp_path / "secret.png"
    cv2.imwrite(str(secret), np.zeros((8, 8, 3), np.uint8))
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    out = Path("/tmp") / f"onnxcam-perm-{os.getpid()}"
    out.mkdir(exist_ok=True)
    os.chmod(out, 0o777)
    code = f"""
import os, sys
import onnxcam, onnxcam.files, onnxcam.explainer, onnxcam.methods, onnxruntime, cv2  # before dropping rights
from onnxcam.cli import main
os.setgid(65534); os.setuid(65534)
main(["explain", {str(ROOT / 'models' / 'shapes_cnn.onnx')!r}, {str(secret)!r}, "--out", {str(out)!r}, "--no-cache"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if "ModuleNotFoundError" in proc.stderr or "PermissionError" in proc.stderr and "onnxcam" not in proc.stderr:
        pytest.skip("the other user cannot import the test environment")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "Permission denied" in lines[0] and lines[0].startswith("error: ")


def test_model_behind_a_folder_this_user_cannot_enter_is_one_line(tmp_path):
    """stat() itself fails there (a clone inside `mktemp -d`, mode 0700, seen by another user)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    model = locked / "m.onnx"
    model.write_bytes(b"x")
    out = Path("/tmp") / f"onnxcam-locked-{os.getpid()}"
    out.mkdir(exist_ok=True)
    os.chmod(out, 0o777)
    os.chmod(locked, 0o700)
    os.chmod(tmp_path, 0o755)
    code = f"""
import os, sys
import onnxcam, onnxcam.files, onnxcam.explainer, onnxcam.methods, onnxruntime, cv2  # before dropping rights
from onnxcam.cli import main
os.setgid(65534); os.setuid(65534)
main(["explain", {str(model)!r}, "nothing.png", "--out", {str(out)!r}, "--no-cache"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if "ModuleNotFoundError" in proc.stderr or "PermissionError" in proc.stderr and "onnxcam" not in proc.stderr:
        pytest.skip("the other user cannot import the test environment")
    if "setuid" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip("this user cannot drop to another one")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot read model file") and "Permission denied" in lines[0]
