"""The on-disk model cache: hits, misses, damaged files and unwritable directories."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import onnx
import pytest

from onnxcam import cache
from onnxcam.cache import cache_key, cached_model, default_cache_dir

from tiny_models import tiny_classifier
from user_path import run_without_privileges

PARTS = {"nodes": ["act"], "family": "gradient", "backend": "portable", "probabilities": False}


class Builder:
    """Counts how often the cache had to build."""

    def __init__(self, proto):
        self.proto, self.calls = proto, 0

    def __call__(self):
        self.calls += 1
        return self.proto


def _entries(directory):
    return sorted(p for p in os.listdir(directory))


def test_miss_then_hit(tmp_path):
    model, built = tiny_classifier(), tiny_classifier(channels=7)
    build = Builder(built)
    first = cached_model(PARTS, model, build, cache_dir=tmp_path)
    second = cached_model(PARTS, model, build, cache_dir=tmp_path)
    assert build.calls == 1
    assert first.SerializeToString() == second.SerializeToString() == built.SerializeToString()
    assert len(_entries(tmp_path)) == 1 and _entries(tmp_path)[0].endswith(".onnxcam")


def test_model_bytes_are_accepted_as_the_model(tmp_path):
    model = tiny_classifier()
    build = Builder(tiny_classifier(channels=7))
    cached_model(PARTS, model, build, cache_dir=tmp_path)
    cached_model(PARTS, model.SerializeToString(), build, cache_dir=tmp_path)
    assert build.calls == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_file_is_rebuilt(tmp_path, damage):
    model = tiny_classifier()
    build = Builder(tiny_classifier(channels=7))
    cached_model(PARTS, model, build, cache_dir=tmp_path)
    path = tmp_path / _entries(tmp_path)[0]
    data = path.read_bytes()
    damaged = {"truncate": data[:len(data) // 2], "flip": data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],
               "garbage": b"not a model at all", "empty": b""}[damage]
    path.write_bytes(damaged)
    again = cached_model(PARTS, model, build, cache_dir=tmp_path)
    assert build.calls == 2
    assert again.SerializeToString() == build.proto.SerializeToString()
    assert path.read_bytes() == data       # rewritten whole
    cached_model(PARTS, model, build, cache_dir=tmp_path)
    assert build.calls == 2


@pytest.mark.parametrize("key, value", [("nodes", ["other"]), ("family", "forward"), ("backend", "ort-training"),
                                        ("probabilities", True)])
def test_key_changes_with_each_part(key, value):
    model_bytes = tiny_classifier().SerializeToString()
    assert cache_key({**PARTS, key: value}, model_bytes) != cache_key(PARTS, model_bytes)
    assert cache_key(dict(reversed(list(PARTS.items()))), model_bytes) == cache_key(PARTS, model_bytes)


def test_key_changes_with_model_and_version(monkeypatch):
    base = cache_key(PARTS, tiny_classifier().SerializeToString())
    assert cache_key(PARTS, tiny_classifier(seed=1).SerializeToString()) != base
    monkeypatch.setattr(cache, "_version", lambda: "999.0")
    assert cache_key(PARTS, tiny_classifier().SerializeToString()) != base


UNWRITABLE_CHILD = """
import json, os, sys
from onnxcam.cache import cached_model
from tiny_models import tiny_classifier
calls = []
built = tiny_classifier(channels=7)
def build():
    calls.append(1)
    return built
same = [cached_model({"nodes": ["act"]}, tiny_classifier(), build, cache_dir=sys.argv[1]) is built
        for _ in range(2)]
print(json.dumps({"calls": len(calls), "same": same, "entries": os.listdir(sys.argv[1])}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_unwritable_dir_disables_caching(tmp_path):
    """Run where permissions bind (as root: with every capability dropped, see user_path)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        done = run_without_privileges(UNWRITABLE_CHILD, str(locked))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"calls": 2, "same": [True, True], "entries": []}
    finally:
        locked.chmod(0o700)


def test_test_cache_is_keyed_by_the_source():
    """The suite's cache folder is named by a digest of onnxcam's sources (tests/conftest.py)."""
    import conftest
    assert Path(os.environ["ONNXCAM_CACHE_DIR"]).name == conftest._source_digest()


def test_cache_dir_that_is_a_file_disables_caching(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    build = Builder(tiny_classifier(channels=7))
    for _ in range(2):
        assert cached_model(PARTS, tiny_classifier(), build, cache_dir=blocker / "sub") is build.proto
    assert build.calls == 2


def test_oversized_models_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "MAX_CACHED_BYTES", 10)
    build = Builder(tiny_classifier(channels=7))
    cached_model(PARTS, onnx.ModelProto(), build, cache_dir=tmp_path)
    cached_model(PARTS, onnx.ModelProto(), build, cache_dir=tmp_path)
    assert build.calls == 2 and _entries(tmp_path) == []


def test_default_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("ONNXCAM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "onnxcam"
