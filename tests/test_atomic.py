"""The one atomic write: files follow the umask like any tool's (mkstemp alone gives 0600), outputs
and cache entries alike; stale temporaries of killed writers are removed, nobody else's files."""
from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest

from onnxcam import atomic, cache, outputs
from tiny_models import tiny_classifier


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_to(value):
        os.umask(value)
        atomic._UMASK = None
    yield set_to
    os.umask(old)
    atomic._UMASK = None


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_and_cache_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    png = outputs.write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    npy = outputs.write_npy(tmp_path / "a.npy", np.zeros(3))
    entry = tmp_path / "c" / "x.onnxcam"
    assert cache._write(entry, tiny_classifier())
    for path in (png, npy, entry):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_stale_temps_removed_only_ours_and_only_old(tmp_path):
    old_ours = tmp_path / ".pic_gradcam.png.abcd_123.tmp"
    fresh_ours = tmp_path / ".pic_gradcam.png.zzzz9999.tmp"
    foreign = [tmp_path / "notes.tmp", tmp_path / ".x.tmp", tmp_path / "pic.png"]
    for p in [old_ours, fresh_ours, *foreign]:
        p.write_bytes(b"x")
    past = time.time() - 3600
    for p in [old_ours, *foreign]:
        os.utime(p, (past, past))
    assert atomic.remove_stale_temps(tmp_path) == 1
    assert not old_ours.exists() and fresh_ours.exists() and all(p.exists() for p in foreign)


def test_failed_write_leaves_nothing(tmp_path):
    def chunks():
        yield b"partial"
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic.write_atomic(tmp_path / "out.bin", chunks())
    assert list(tmp_path.iterdir()) == []
