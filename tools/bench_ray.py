"""Throughput of the Ray engine against the single-process run, in one process on this machine.

    python tools/bench_ray.py                       # EfficientNet-Lite0 if built, else the shapes CNN
    python tools/bench_ray.py --model models/shapes_cnn.onnx --images 512

Runs, on the same image files and writing the same outputs (Grad-CAM overlays, atomically):
  single-process with 1 ONNX Runtime thread, and with --cpus threads (what `onnxcam explain` does);
  Ray with 1 actor and with --cpus actors, 1 thread each (`--engine ray --workers N`).
Reports images/s end to end and in the steady state (from the first batch's outputs to the last, by
the files' modification times, which every engine writes as it explains: actor start-up excluded), the scaling efficiency of N actors (steady rate(N) / (N x steady rate(1))),
and Ray's cost: fixed (pipeline + actor start: time to the first results, over one single-process
batch) and per batch (steady time per batch of one actor, over the single-process time per batch, both
1 thread). Ray's own start-up (ray.init) is timed apart. Every run's PNGs are checked byte-equal to the
single-process ones. A script, not a test.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def make_images(model: Path, folder: Path, n: int) -> list[Path]:
    """Real photos (skimage) for EfficientNet, synthetic shapes for the shapes CNN."""
    if "shapes" in model.name:
        import shapes_data
        images = list(shapes_data.make_dataset(n, seed=3)[0])
    else:
        from skimage import data
        photos = [getattr(data, name)() for name in ("chelsea", "coffee", "rocket", "astronaut")]
        images = [photos[i % 4][(i // 4) % 16:, (i // 4) % 24:] for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rgb in enumerate(images):
        path = folder / f"img{i:04d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def single(model, paths, out, threads, batch_size):
    from onnxcam import Explainer
    from onnxcam.files import FileExplainer
    from onnxcam.model import load_model
    from onnxcam.preprocess import Preprocessing

    loaded = load_model(model)
    pre = Preprocessing.from_metadata(loaded.preprocess, loaded.input.shape)
    start = time.perf_counter()
    explainer = Explainer(loaded, ["auto"], layout=pre.layout, threads=threads,
                          input_shape=pre.probe_shape(loaded.input.shape))
    runner = FileExplainer(explainer, pre, out, ["gradcam"], batch_size=batch_size, overwrite=True)
    wall = time.time()
    count = sum(1 for _ in runner.run(paths))
    return time.perf_counter() - start, count, written_at(out, wall)


def written_at(out: Path, wall: float) -> list[float]:
    """Seconds from the run's start at which each output file was written, in order."""
    return sorted(p.stat().st_mtime - wall for p in out.glob("*.png"))


def on_ray(model, paths, out, workers, batch_size):
    from onnxcam.distributed import explain_dataset
    from onnxcam.model import load_model
    from onnxcam.preprocess import Preprocessing

    loaded = load_model(model)
    pre = Preprocessing.from_metadata(loaded.preprocess, loaded.input.shape)
    start, wall = time.perf_counter(), time.time()
    run = explain_dataset(loaded, paths, out, methods=["gradcam"], preprocessing=pre, workers=workers,
                          worker_threads=1, batch_size=batch_size, overwrite=True,
                          explainer_options=dict(layout=pre.layout,
                                                 input_shape=pre.probe_shape(loaded.input.shape)))
    assert not run.failed, run.failed
    return time.perf_counter() - start, len(run.results), written_at(out, wall)


def steady(stamps: list[float], batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch's outputs, images/s after them)."""
    first = stamps[batch_size - 1]
    return first, (len(stamps) - batch_size) / max(1e-9, stamps[-1] - first)


def same_pngs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.png"))
    return names == sorted(p.name for p in b.glob("*.png")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main():
    efficientnet = ROOT / ".cache" / "models" / "efficientnet_lite0.onnx"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path,
                        default=efficientnet if efficientnet.exists() else ROOT / "models" / "shapes_cnn.onnx")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.setdefault("ONNXCAM_CACHE_DIR", str(ROOT / ".cache" / "onnxcam-bench"))
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    try:
        paths = make_images(args.model, work / "in", args.images)
        print(f"model {args.model.name}, {len(paths)} images, batch {args.batch_size}, {args.cpus} CPUs; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        single(args.model, paths[: args.batch_size], work / "warm", 1, args.batch_size)   # fill the cache
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"ray.init: {time.perf_counter() - start:.2f} s (once per job, not counted below)")
        rows = {}
        rows["single, 1 thread"] = single(args.model, paths, work / "s1", 1, args.batch_size)
        rows[f"single, {args.cpus} threads"] = single(args.model, paths, work / "sN", args.cpus, args.batch_size)
        rows["ray, 1 worker"] = on_ray(args.model, paths, work / "r1", 1, args.batch_size)
        rows[f"ray, {args.cpus} workers"] = on_ray(args.model, paths, work / "rN", args.cpus, args.batch_size)
        rates = {}
        for name, (seconds, count, stamps) in rows.items():
            assert count == len(paths), (name, count)
            first, rates[name] = steady(stamps, args.batch_size)
            print(f"{name:>22}: {seconds:7.2f} s  {len(paths) / seconds:6.1f} images/s end to end; "
                  f"first batch after {first:5.2f} s, then {rates[name]:6.1f} images/s")
        one, many = rates["ray, 1 worker"], rates[f"ray, {args.cpus} workers"]
        print(f"scaling efficiency (steady), {args.cpus} workers vs 1: {many / (args.cpus * one):.2f} "
              f"({many / one:.2f}x); vs single-process with {args.cpus} threads: "
              f"{many / rates[f'single, {args.cpus} threads']:.2f}x")
        first_single = steady(rows["single, 1 thread"][2], args.batch_size)[0]
        first_ray = steady(rows["ray, 1 worker"][2], args.batch_size)[0]
        per_batch = args.batch_size / one - args.batch_size / rates["single, 1 thread"]
        print(f"ray fixed cost per run (first outputs, over single-process): {first_ray - first_single:.2f} s; "
              f"per batch of {args.batch_size}: {per_batch * 1000:.0f} ms "
              f"({per_batch / (args.batch_size / rates['single, 1 thread']):+.0%})")
        same = all(same_pngs(work / "s1", work / d) for d in ("sN", "r1", "rN"))
        print(f"PNGs byte-equal across all runs: {same}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
