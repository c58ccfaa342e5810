"""Fuzz: 400 seeded mutations (100 each) of a PNG, a JPEG, a .npy array and an .onnx model through the
command line (in process). Each run ends in valid outputs (exit 0; every PNG decodes, every .npy
loads, finite) or one `error: ...` line (exit 1): never a traceback, a hang or a partial file."""
from __future__ import annotations

import io
import signal

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcam.cli import main
from tiny_models import tiny_classifier

CASES_PER_KIND = 100
SECONDS_PER_CASE = 30


def _samples():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    jpg = cv2.imencode(".jpg", image)[1].tobytes()
    buffer = io.BytesIO()
    np.save(buffer, rng.normal(size=(3, 8, 8)).astype(np.float32))
    model = tiny_classifier(size=8).SerializeToString()
    return {"png": png, "jpg": jpg, "npy": buffer.getvalue(), "onnx": model}


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 6))
        pos = int(rng.integers(0, len(b))) if b else 0
        if kind == 0:                                   # flip bits
            for _ in range(int(rng.integers(1, 9))):
                i = int(rng.integers(0, len(b)))
                b[i] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:                                 # overwrite with random bytes
            n = int(rng.integers(1, 16))
            b[pos:pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif kind == 2:                                 # truncate
            del b[pos:]
        elif kind == 3:                                 # insert random bytes
            b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif kind == 4:                                 # duplicate a range
            n = int(rng.integers(1, 256))
            b[pos:pos] = b[pos:pos + n]
        else:                                           # extreme values in the header
            i = int(rng.integers(0, min(len(b), 64))) if b else 0
            b[i:i + 4] = bytes([0xFF, 0xFF, 0x7F, 0x00])
    return bytes(b)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def check_outcome(result, out, label):
    assert not isinstance(result.exception, Hang), f"{label}: hung"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        raise AssertionError(f"{label}: traceback\n" + "".join(traceback.format_exception(result.exception)))
    lines = [line for line in result.output.splitlines() if line.strip()]
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"{label}: partial files {leftovers}"
    if result.exit_code == 0:
        for p in out.rglob("*.png"):
            assert cv2.imread(str(p)) is not None, f"{label}: unreadable output {p}"
        for p in out.rglob("*.npy"):
            assert np.isfinite(np.load(p)).all(), f"{label}: non-finite map {p}"
        return "ok"
    assert result.exit_code == 1, f"{label}: exit {result.exit_code}\n{result.output}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}:\n{result.output}"
    return "error"


@pytest.mark.parametrize("kind", ["png", "jpg", "npy", "onnx"])
def test_fuzz_cli(tmp_path, kind):
    samples = _samples()
    rng = np.random.default_rng({"png": 1, "jpg": 2, "npy": 3, "onnx": 4}[kind])
    model = tmp_path / "tiny.onnx"
    model.write_bytes(samples["onnx"])
    good_input = tmp_path / "good.npy"
    good_input.write_bytes(samples["npy"])
    runner = CliRunner()
    outcomes = {"ok": 0, "error": 0}
    failures = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(CASES_PER_KIND):
            data = mutate(samples[kind], rng)
            out = tmp_path / f"out{case}"
            if kind == "onnx":
                target = tmp_path / f"m{case}.onnx"
                target.write_bytes(data)
                args = ["explain", str(target), str(good_input)]
            else:
                target = tmp_path / f"in{case}.{kind}"
                target.write_bytes(data)
                args = ["explain", str(model), str(target)]
            args += ["--out", str(out), "--no-cache", "--npy"]
            signal.alarm(SECONDS_PER_CASE)
            try:
                result = runner.invoke(main, args, catch_exceptions=True)
            finally:
                signal.alarm(0)
            try:
                outcomes[check_outcome(result, out, f"{kind} case {case}")] += 1
            except AssertionError as exc:
                failures.append(str(exc)[-600:])
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"fuzz {kind}: {outcomes}")
    assert not failures, "\n\n".join(failures)
    assert outcomes["error"] > 0          # the mutations do break files
