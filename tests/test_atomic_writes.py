"""Writes are atomic: a write that fails half-way leaves no file and no temp file (and an existing file
untouched), for result files and for the model cache.

The failure is injected by the operating system, not by patching onnxcam: a child process lowers its
file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) so that any write past N bytes fails with EFBIG,
whatever code path does the writing. A second check wraps os.replace / os.rename to look at the
destination at the moment of the rename: until then a reader sees the old file or none.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcam import OnnxcamError, outputs
from onnxcam.cache import cached_model

from tiny_models import tiny_classifier

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 4096
PARTS = {"nodes": ["act"], "family": "gradient", "backend": "portable", "probabilities": False}

CHILD = r"""
import json, os, resource, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from onnxcam import OnnxcamError, outputs
from onnxcam.cache import cached_model
from tiny_models import tiny_classifier

jobs, limit = json.loads(sys.argv[1]), int(sys.argv[3])
big = tiny_classifier(channels=64, classes=100)        # serialises to well over the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
reports = {}
for folder, case in jobs:
  report = reports[folder] = {"error": None}
  try:
    if case == "bytes":
        outputs.write_bytes_atomic(os.path.join(folder, "out.bin"), os.urandom(4 * limit))
    elif case == "png":
        noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        outputs.write_png(os.path.join(folder, "out.png"), noise)
    elif case == "npy":
        outputs.write_npy(os.path.join(folder, "out.npy"), np.arange(4 * limit, dtype=np.float32))
    elif case == "cache":
        got = cached_model({"nodes": ["act"]}, tiny_classifier(), lambda: big, cache_dir=folder)
        report["returned_the_build"] = got.SerializeToString() == big.SerializeToString()
  except OnnxcamError as exc:
    report["error"] = str(exc)
print(json.dumps(reports))
"""


CASES = [("bytes", "out.bin"), ("png", "out.png"), ("npy", "out.npy")]


@pytest.fixture(scope="module")
def failed_writes(tmp_path_factory):
    """One child process runs every failing write, each in a folder of its own: {(case, existing): folder}
    and the child's report per folder."""
    base = tmp_path_factory.mktemp("w")
    folders = {}
    for case, name in CASES:
        for existing in (False, True):
            folder = base / f"{case}{int(existing)}"
            folder.mkdir()
            if existing:
                (folder / name).write_bytes(b"previous result")
            folders[case, existing] = folder
    folders["cache", False] = base / "cache"
    folders["cache", False].mkdir()
    jobs = [(str(folder), case) for (case, _), folder in folders.items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs), str(ROOT / "tests"), str(LIMIT)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return folders, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, name", CASES)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_output_write_leaves_no_partial_file(failed_writes, case, name, existing):
    folders, reports = failed_writes
    folder = folders[case, existing]
    assert reports[str(folder)]["error"] == f"cannot write {folder / name} (File too large); check the --out folder"
    if existing:
        assert os.listdir(folder) == [name] and (folder / name).read_bytes() == b"previous result"
    else:
        assert os.listdir(folder) == []


def test_failed_cache_write_leaves_no_file_and_still_returns_the_model(failed_writes):
    folders, reports = failed_writes
    folder = folders["cache", False]
    assert reports[str(folder)] == {"error": None, "returned_the_build": True}
    assert os.listdir(folder) == []


class RenameSpy:
    """Wraps os.replace and os.rename: records what a reader of the destination would see just before
    the rename, and what the source holds."""

    def __init__(self, monkeypatch):
        self.seen = []
        for name in ("replace", "rename"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real):
        def spy(src, dst, *args, **kwargs):
            dst_bytes = Path(dst).read_bytes() if os.path.exists(dst) else None
            self.seen.append((Path(src).read_bytes(), Path(dst), dst_bytes))
            return real(src, dst, *args, **kwargs)
        return spy


@pytest.mark.parametrize("writer", ["png", "npy", "bytes"])
def test_readers_see_the_old_file_until_the_new_one_is_complete(tmp_path, monkeypatch, writer):
    path = tmp_path / f"result.{writer}"
    path.write_bytes(b"old")
    spy = RenameSpy(monkeypatch)
    picture = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    if writer == "png":
        outputs.write_png(path, picture)
    elif writer == "npy":
        outputs.write_npy(path, picture)
    else:
        outputs.write_bytes_atomic(path, picture.tobytes())
    final = path.read_bytes()
    assert len(spy.seen) == 1, "the result must appear by one rename"
    source, destination, before = spy.seen[0]
    assert destination == path and before == b"old" and source == final
    if writer == "npy":
        import io
        np.testing.assert_array_equal(np.load(io.BytesIO(final)), picture)
    assert os.listdir(tmp_path) == [path.name]


def test_cache_file_appears_by_one_rename_complete(tmp_path, monkeypatch):
    spy = RenameSpy(monkeypatch)
    built = tiny_classifier(channels=7)
    cached_model(PARTS, tiny_classifier(), lambda: built, cache_dir=tmp_path)
    (entry,) = os.listdir(tmp_path)
    assert len(spy.seen) == 1
    source, destination, before = spy.seen[0]
    assert destination == tmp_path / entry and before is None and source == (tmp_path / entry).read_bytes()
    again = cached_model(PARTS, tiny_classifier(), lambda: onnx.ModelProto(), cache_dir=tmp_path)
    assert again.SerializeToString() == built.SerializeToString()


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    def refuse(src, dst, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OnnxcamError) as info:
        outputs.write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    assert str(info.value) == f"cannot write {tmp_path / 'a.png'} (Permission denied); check the --out folder"
    built = tiny_classifier(channels=7)
    assert cached_model(PARTS, tiny_classifier(), lambda: built, cache_dir=tmp_path / "cache") is built
    assert os.listdir(tmp_path) == ["cache"] and os.listdir(tmp_path / "cache") == []
