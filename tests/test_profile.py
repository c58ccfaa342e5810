"""`onnxcam explain --profile` and the lazy imports: what a CLI call pays for before and after its run."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from onnxcam import profile as profile_module

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "models" / "shapes_cnn.onnx"


def _run(args, env_extra, cwd):
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_profile_line_on_stderr(tmp_path):
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    args = ["-m", "onnxcam.cli", "explain", str(SHAPES), str(image), "--out", str(tmp_path / "out"),
            "--json", "--profile", "--overwrite"]
    env = {"ONNXCAM_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):             # cold, then warm cache
        result = _run(args, env, tmp_path)
        assert result.returncode == 0, result.stderr
    json.loads(result.stdout)      # stdout stays the JSON summary alone
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("profile (s): ")
    fields = dict(part.rsplit(" ", 1) for part in line[len("profile (s): "):].split(" | "))
    for name in ("imports", "model load", "node table", "session", "reading", "run", "writing", "other",
                 "total"):
        assert float(fields[name]) >= 0, name
    parts = sum(float(v) for k, v in fields.items() if k != "total")
    assert abs(parts - float(fields["total"])) < 0.01       # exclusive phases add up to the total


def test_arrays_with_in_graph_maps_import_neither_cv2_nor_torch(tmp_path):
    code = ("import sys, numpy as np; from onnxcam import Explainer; "
            f"e = Explainer({str(SHAPES)!r}, 'auto', maps='graph'); "
            "m = e.explain_many(np.zeros((2, 3, 64, 64), np.float32), ['gradcam', 'layercam']); "
            "print('cv2' in sys.modules, 'torch' in sys.modules, sorted(m))")
    result = _run(["-c", code], {"ONNXCAM_CACHE_DIR": str(tmp_path)}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "['gradcam',", "'layercam']"]


def test_nested_phases_are_charged_once(monkeypatch):
    # perf_counter readings: start, run in, session in, session out, run out, report
    clock = iter([0.0, 1.0, 2.0, 4.0, 5.0, 6.0])
    monkeypatch.setattr(profile_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(profile_module, "_process_age", lambda: None)
    p = profile_module.Profile()
    p.start(import_start=-0.5)                            # imports: 0.5 s before the command
    with p.phase("run"):
        with p.phase("session"):
            pass
    assert p.seconds == {"imports": 0.5, "session": 2.0, "run": 2.0}
    assert p.report() == "profile (s): imports 0.500 | session 2.000 | run 2.000 | other 2.000 | total 6.500"


def test_console_entry_point_skips_teardown_but_keeps_outputs_and_exit_codes(tmp_path):
    """``run`` ends the process with os._exit after the command: every file and every byte of stdout
    is still there (a JSON summary of 12 inputs through a pipe), and the exit codes are the command's:
    0, 1 for an OnnxcamError (one line), 2 for a usage error."""
    images = []
    for i in range(12):
        images.append(tmp_path / f"photo{i}.png")
        cv2.imwrite(str(images[-1]), np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    env = {"ONNXCAM_CACHE_DIR": str(tmp_path / "cache")}
    ok = _run(["-m", "onnxcam.cli", "explain", str(SHAPES), *map(str, images), "--out", str(tmp_path / "out"),
               "--json", "--npy", "--method", "gradcam,layercam"], env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert len(summary["results"]) == 24
    for result in summary["results"]:
        for output in result["outputs"]:
            assert Path(output).stat().st_size > 0, output
    assert all(cv2.imread(str(p)) is not None for p in (tmp_path / "out").glob("*.png"))
    error = _run(["-m", "onnxcam.cli", "explain", str(tmp_path / "missing.onnx"), str(images[0])], env, tmp_path)
    assert error.returncode == 1 and error.stderr.startswith("error: ") and len(error.stderr.splitlines()) == 1
    usage = _run(["-m", "onnxcam.cli", "explain", "--no-such-flag"], env, tmp_path)
    assert usage.returncode == 2 and "No such option" in usage.stderr
    version = _run(["-m", "onnxcam.cli", "--version"], env, tmp_path)
    assert version.returncode == 0 and "version" in version.stdout
