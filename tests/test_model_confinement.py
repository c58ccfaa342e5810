"""External weights are read only from plain files inside the model's own folder, whatever the
installed onnx would allow: a symlink, a `../` path, an absolute path and a hard-linked file are
refused with one line saying what and why; a sound external-data model loads with the same values."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcam.errors import OnnxcamError
from onnxcam.model import load_model
from tiny_models import tiny_classifier


def _save_external(model_dir, name="m.onnx", location="m.onnx.data"):
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / name
    onnx.save_model(tiny_classifier(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _set_location(path, location):
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


def _weights(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_plain_external_data_loads_the_same_values(tmp_path):
    path = _save_external(tmp_path / "model")
    loaded = load_model(path).proto
    expected = _weights(tiny_classifier())
    got = _weights(loaded)
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_symlinked_external_data_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s3cr3t" * 4096)
    path = _save_external(tmp_path / "model")
    (tmp_path / "model" / "m.onnx.data").unlink()
    os.symlink(secret, tmp_path / "model" / "m.onnx.data")
    with pytest.raises(OnnxcamError, match="symbolic link") as info:
        load_model(path)
    assert "re-copy" not in str(info.value) and "\n" not in str(info.value)


def test_symlink_inside_the_folder_is_refused_too(tmp_path):
    path = _save_external(tmp_path / "model")
    os.rename(tmp_path / "model" / "m.onnx.data", tmp_path / "model" / "real.data")
    os.symlink("real.data", tmp_path / "model" / "m.onnx.data")
    with pytest.raises(OnnxcamError, match="symbolic link"):
        load_model(path)


def test_dotdot_external_data_is_refused(tmp_path):
    path = _save_external(tmp_path / "model")
    os.rename(tmp_path / "model" / "m.onnx.data", tmp_path / "outside.data")
    _set_location(path, "../outside.data")
    with pytest.raises(OnnxcamError, match="outside the model's folder"):
        load_model(path)


def test_absolute_external_data_is_refused(tmp_path):
    path = _save_external(tmp_path / "model")
    _set_location(path, "/etc/passwd")
    with pytest.raises(OnnxcamError, match="outside the model's folder"):
        load_model(path)


def test_hard_linked_external_data_is_refused(tmp_path):
    path = _save_external(tmp_path / "model")
    os.link(tmp_path / "model" / "m.onnx.data", tmp_path / "other_name")
    with pytest.raises(OnnxcamError, match="2 hard links"):
        load_model(path)


def test_truncated_external_data_is_one_line(tmp_path):
    path = _save_external(tmp_path / "model")
    data = tmp_path / "model" / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(OnnxcamError, match="truncated"):
        load_model(path)


def test_cli_refusal_is_one_line(tmp_path):
    from click.testing import CliRunner

    from onnxcam.cli import main
    path = _save_external(tmp_path / "model")
    os.rename(tmp_path / "model" / "m.onnx.data", tmp_path / "outside.data")
    _set_location(path, "../outside.data")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((3, 8, 8), np.float32))
    result = CliRunner().invoke(main, ["explain", str(path), str(x), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], result.output


def test_digest_is_the_file_bytes_only_when_they_hold_the_whole_model(tmp_path):
    """The cache keys start from this digest: an external-data model's file alone is not the model."""
    import hashlib
    whole = tmp_path / "whole.onnx"
    onnx.save(tiny_classifier(), str(whole))
    assert load_model(whole).digest == hashlib.sha256(whole.read_bytes()).digest()
    assert load_model(_save_external(tmp_path / "model")).digest is None
    assert load_model(tiny_classifier()).digest is None      # a proto: the explainer serializes it
