"""The on-disk model cache: hits, misses, damaged files and unwritable directories."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import onnx
import pytest

from onnxcam import cache
from onnxcam.cache import cache_key, cached_json, cached_model, cached_model_bytes, default_cache_dir, model_digest

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
    folder = conftest._test_cache_dir()
    assert folder.name == conftest._source_digest() and folder.parent.name == "onnxcam-tests"
    if Path(os.environ["ONNXCAM_CACHE_DIR"]).parent == folder.parent:     # not overridden by the user
        assert Path(os.environ["ONNXCAM_CACHE_DIR"]) == folder


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


# ---- size cap, LRU eviction, `onnxcam cache info|clear` ------------------------------------------

def _parts(i):
    return dict(PARTS, nodes=[f"n{i}"])


def _as_model(parts, model, build, folder):
    return cached_model(parts, model, build, cache_dir=folder)


def _as_bytes(parts, model, build, folder):
    return cached_model_bytes(parts, model_digest(model), build, cache_dir=folder)


FACTS = {"table": list(range(400))}   # a JSON fact about the size of the tiny model


def _as_facts(parts, model, build, folder):
    def facts():
        build()
        return FACTS
    assert cached_json(parts, model_digest(model), facts, cache_dir=folder) == FACTS


def _entry_size(cache_it, model):
    payload = json.dumps(FACTS).encode() if cache_it is _as_facts else model.SerializeToString()
    return len(payload) + 48


# cached_model_bytes is what every session is made from: before, it wrote past the cap and never
# marked a read, so its entries were evicted by age of writing, not of use; the JSON facts (node table,
# output shapes) were written even with a cap of 0 and never evicted nor cleared
@pytest.mark.parametrize("cache_it", [_as_model, _as_bytes, _as_facts], ids=["model", "bytes", "facts"])
def test_cap_evicts_least_recently_used(tmp_path, monkeypatch, cache_it):
    model = tiny_classifier()
    size = _entry_size(cache_it, model)
    monkeypatch.setenv("ONNXCAM_CACHE_MAX_MB", str(3.5 * size / 2**20))   # room for three entries
    for i in range(3):
        cache_it(_parts(i), model, Builder(model), tmp_path)
    suffix = ".json" if cache_it is _as_facts else ".onnxcam"
    paths = {i: tmp_path / f"{cache_key(_parts(i), model.SerializeToString())}{suffix}" for i in range(5)}
    for age, i in ((300, 0), (200, 1), (100, 2)):
        os.utime(paths[i], (os.path.getmtime(paths[i]) - age,) * 2)
    hit = Builder(model)
    cache_it(_parts(0), model, hit, tmp_path)          # a read makes entry 0 recent
    assert hit.calls == 0
    cache_it(_parts(3), model, Builder(model), tmp_path)
    assert {i for i, p in paths.items() if p.exists()} == {0, 2, 3}   # 1 was least recently used
    monkeypatch.setenv("ONNXCAM_CACHE_MAX_MB", "0")
    cache_it(_parts(4), model, Builder(model), tmp_path)
    assert not paths[4].exists()


def test_zero_cap_keeps_nothing_and_bad_cap_is_an_error(tmp_path, monkeypatch):
    model = tiny_classifier()
    monkeypatch.setenv("ONNXCAM_CACHE_MAX_MB", "0")
    cached_model(PARTS, model, Builder(model), cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.onnxcam"))
    monkeypatch.setenv("ONNXCAM_CACHE_MAX_MB", "lots")
    from onnxcam.errors import OnnxcamError
    with pytest.raises(OnnxcamError, match="ONNXCAM_CACHE_MAX_MB"):
        cached_model(PARTS, model, Builder(model), cache_dir=tmp_path)


def test_cache_info_and_clear_commands(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnxcam.cli import main
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path))
    model = tiny_classifier()
    for i in range(2):
        cached_model(_parts(i), model, Builder(model))
    _as_facts(_parts(0), model, Builder(model), None)
    (tmp_path / ".x.onnxcam.abcdefgh.tmp").write_bytes(b"partial")    # a killed writer's
    (tmp_path / "mine.txt").write_text("not the cache's")
    (tmp_path / "settings.json").write_text("{}")                      # not named by a cache key
    info = json.loads(CliRunner().invoke(main, ["cache", "info", "--json"]).output)
    assert info["entries"] == 3 and info["temporaries"] == 1 and info["max_bytes"] == 2048 * 2**20
    ours = [*tmp_path.glob("*.onnxcam"), *(p for p in tmp_path.glob("*.json") if p.name != "settings.json")]
    assert len(ours) == 3 and info["bytes"] == sum(p.stat().st_size for p in ours)
    text = CliRunner().invoke(main, ["cache", "info"]).output
    assert "3 entries" in text and "of 2048 MB" in text
    result = CliRunner().invoke(main, ["cache", "clear"])
    assert result.exit_code == 0 and "removed 3 cache entries" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "settings.json"]


def test_cache_keys_follow_the_onnxcam_source(tmp_path, monkeypatch):
    """An entry built by other onnxcam code (a stale node table from a development checkout, an
    upgrade) is never read back: the key holds a digest of the package's sources."""
    import onnxcam.cache as cache_module
    parts = {"family": "test"}
    first = cache_module.cache_key(parts, b"model")
    cache_module._version.cache_clear()
    monkeypatch.setattr(cache_module, "__file__", str(tmp_path / "cache.py"))
    (tmp_path / "cache.py").write_text("# other code\n")
    try:
        assert cache_module.cache_key(parts, b"model") != first
    finally:
        cache_module._version.cache_clear()
