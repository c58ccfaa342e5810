"""Peak memory of `onnxcam explain` on large and malicious PNGs, each in a fresh process.

    python tools/image_memory.py [--model models/shapes_cnn.onnx] [--size 20000]

Prints, for a small baseline photo, a SIZE x SIZE PNG (refused at the default --max-pixels, then
explained with --max-pixels 0) and a 30000 x 30000 decompression bomb (2.6 MB on disk, 2.7 GB decoded):
the exit code, the first line of stderr and the peak resident memory of the process (VmHWM).
A script, never a test (the 20000^2 case takes a minute of CPU to encode its PNG).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from image_bombs import write_bomb, write_png  # noqa: E402

CHILD = """
import resource, sys
from onnxcam.cli import main
try:
    main(sys.argv[1:])
finally:
    # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"peak_rss_mb {int(hwm.split()[1]) / 1024:.0f}", file=sys.stderr)
"""


def run(args: list[str]) -> tuple[int, str, float, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                         "ONNXCAM_CACHE_DIR": str(ROOT / ".cache" / "onnxcam-tests")})
    lines = proc.stderr.strip().splitlines()
    peak = float(next(line.split()[1] for line in lines if line.startswith("peak_rss_mb")))
    message = next((line for line in lines if not line.startswith("peak_rss_mb")), "")
    return proc.returncode, message, peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "shapes_cnn.onnx"))
    parser.add_argument("--size", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = write_png(tmp / "small.png", 640, 480, row=lambda y: (bytes(range(256)) * 8)[:1920])
        n = args.size
        band = bytes((x // 80) % 256 for x in range(3 * n))
        big = write_png(tmp / "big.png", n, n, row=lambda y: band, level=6)
        bomb = write_bomb(tmp / "bomb.png", 30000, 30000)
        cases = [("baseline 640x480", small, []), (f"{n}x{n} default limit", big, []),
                 (f"{n}x{n} --max-pixels 0", big, ["--max-pixels", "0"]),
                 ("bomb 30000x30000 default limit", bomb, []),
                 ("bomb 30000x30000 --method all, default limit", bomb, ["--method", "all"])]
        for label, path, extra in cases:
            code, message, peak, seconds = run(["explain", args.model, str(path), "--out", str(tmp / "out"),
                                                "--overwrite", *extra])
            size = path.stat().st_size / 1e6
            print(f"{label:48s} file {size:7.2f} MB  exit {code}  peak RSS {peak:7.0f} MB  {seconds:5.1f} s  "
                  f"{message[:110]}")


if __name__ == "__main__":
    main()
