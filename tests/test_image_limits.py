"""Images are sized from their headers before decoding: decompression bombs and oversized images are
refused with one line at a tiny memory cost, even under a memory limit that decoding would break;
overlays cost a small multiple of the image's bytes. Oracles: the sizes cv2 wrote, the kernel's
peak-RSS accounting of a fresh process, and an address-space limit (setrlimit)."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from image_bombs import write_bomb, write_png
from onnxcam.errors import OnnxcamError
from onnxcam.image_header import HeaderError, image_size
from onnxcam.preprocess import read_image

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shapes_cnn.onnx"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm"])
def test_header_sizes_match_what_cv2_wrote(tmp_path, suffix):
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / f"x{suffix}"
    assert cv2.imwrite(str(path), image)
    with open(path, "rb") as f:
        assert image_size(f) == (53, 37)


def test_jpeg_size_found_after_a_large_app_segment(tmp_path):
    ok, data = cv2.imencode(".jpg", np.zeros((21, 34, 3), np.uint8))
    data = data.tobytes()
    app = b"\xff\xe1" + struct.pack(">H", 60002) + b"\x00" * 60000     # an EXIF-sized segment
    assert image_size(io.BytesIO(data[:2] + app + data[2:])) == (34, 21)


def test_damaged_headers_are_errors():
    with pytest.raises(HeaderError):
        image_size(io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20))
    with pytest.raises(HeaderError):
        image_size(io.BytesIO(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 8))
    assert image_size(io.BytesIO(b"hello world")) is None


def test_1kb_png_declaring_100000_squared_is_one_line(tmp_path):
    from image_bombs import _chunk
    path = tmp_path / "huge.png"             # a 1 KB file: the header and a few compressed bytes
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"\x78\xda" + bytes(980)))
    assert path.stat().st_size < 1100
    with pytest.raises(OnnxcamError, match="declares 100000x100000 pixels"):
        read_image(path)


def test_limit_is_configurable(tmp_path):
    path = write_png(tmp_path / "p.png", 300, 200)
    assert read_image(path).shape == (200, 300, 3)
    with pytest.raises(OnnxcamError, match="over the limit"):
        read_image(path, max_pixels=59_999)
    assert read_image(path, max_pixels=60_000).shape == (200, 300, 3)


def test_opencv_backstop_limit_is_one_line(tmp_path):
    """OpenCV's own limit (set from --max-pixels at the first read, for formats whose header onnxcam
    does not parse) reads as one line saying which variable to raise."""
    bomb = write_bomb(tmp_path / "bomb.png", 3000, 1000)
    code = f"""
import os
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "1000000"
from onnxcam.cli import main
main(["explain", {str(MODEL)!r}, {str(bomb)!r}, "--out", {str(tmp_path / 'o')!r}, "--max-pixels", "0"])
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "OPENCV_IO_MAX_IMAGE_PIXELS=1000000" in lines[0], lines


def test_truncated_png_is_one_line(tmp_path):
    path = write_png(tmp_path / "p.png", 300, 200, row=lambda y: bytes((y + x) % 256 for x in range(900)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OnnxcamError, match="not a readable image"):
        read_image(path)


CHILD = """
import resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from onnxcam.cli import main
def peak_mb():
    # VmHWM belongs to this process's own address space; ru_maxrss would carry the parent's peak over
    # fork + exec (a pytest process that ran the EfficientNet tests first reported ~6.5 GB here)
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:
    main(sys.argv[2:])
finally:
    print(f"peak_rss_mb {peak_mb():.1f}", file=sys.stderr)
"""


def run_cli(limit: int, *args) -> tuple[int, list[str], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ONNXCAM_THREADS": "1"}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)   # set by in-process reads of earlier tests
    proc = subprocess.run([sys.executable, "-c", CHILD, str(limit), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    peak = float(next(line.split()[1] for line in lines if line.startswith("peak_rss_mb")))
    return proc.returncode, [line for line in lines if not line.startswith("peak_rss_mb")], peak


LIMIT = 2 << 30   # 2 GiB of address space: a normal run fits, decoding the bomb (2.7 GB) cannot


def test_bomb_refused_under_a_memory_limit(tmp_path):
    small = write_png(tmp_path / "small.png", 64, 64)
    code, lines, _ = run_cli(LIMIT, "explain", MODEL, small, "--out", tmp_path / "o")
    assert code == 0, lines              # the limit leaves room for a normal run
    bomb = write_bomb(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 3_000_000
    for extra in ([], ["--method", "all"]):
        code, lines, peak = run_cli(LIMIT, "explain", MODEL, bomb, "--out", tmp_path / "o", *extra)
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
        assert "30000x30000" in lines[0] and "--max-pixels" in lines[0]
        assert peak < 400, peak          # measured ~80-110 MB: nothing was decoded
    assert not [p for p in (tmp_path / "o").iterdir() if "bomb" in p.name]


def test_bomb_without_the_limit_fails_in_one_line_under_a_memory_limit(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png", 30000, 30000)
    code, lines, _ = run_cli(LIMIT, "explain", MODEL, bomb, "--out", tmp_path / "o", "--max-pixels", "0")
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "not enough memory" in lines[0] and "Traceback" not in "\n".join(lines)


def test_overlay_memory_is_a_small_multiple_of_the_image(tmp_path):
    """Peak RSS above a 64x64 run, for a 4000x4000 photo (48 MB decoded): measured 2.8-3.0x the image
    bytes (decode + uint8 overlay + PNG encode); a float32 overlay would be ~12x."""
    small = write_png(tmp_path / "small.png", 64, 64)
    band = bytes((x // 40) % 256 for x in range(12000))
    big = write_png(tmp_path / "big.png", 4000, 4000, row=lambda y: band, level=1)
    _, _, base = run_cli(0, "explain", MODEL, small, "--out", tmp_path / "o")
    code, lines, peak = run_cli(0, "explain", MODEL, big, "--out", tmp_path / "o")
    assert code == 0, lines
    image_mb = 4000 * 4000 * 3 / 2**20
    print(f"4000x4000: {peak - base:.0f} MB above baseline = {(peak - base) / image_mb:.2f}x image bytes")
    assert peak - base < 4.5 * image_mb
    out = cv2.imread(str(tmp_path / "o" / "big_gradcam.png"))
    assert out.shape == (4000, 4000, 3)
