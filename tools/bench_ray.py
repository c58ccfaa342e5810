"""Throughput of the Ray engine against the single-process run, in one process on this machine.

    python tools/bench_ray.py                       # EfficientNet-Lite0 if built, else the shapes CNN
    python tools/bench_ray.py --model models/shapes_cnn.onnx --images 512

Runs, on the same image files and writing the same outputs (Grad-CAM overlays, atomically):
  single-process with 1 ONNX Runtime thread, and with --cpus threads (what `onnxcam explain` does);
  Ray with 1 actor and with --cpus actors, 1 thread each (`--engine ray --workers N`).
Reports images/s, the scaling efficiency of N actors (rate(N) / (N x rate(1))), and Ray's cost:
fixed (pipeline + actor start, from a one-batch run) and per batch (what is left after the fixed
cost, over the single-process time, divided by the batches). Ray's own start-up (ray.init) is timed
apart. Every Ray run's PNGs are checked byte-equal to the single-process ones. A script, not a test.
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
    count = sum(1 for _ in runner.run(paths))
    return time.perf_counter() - start, count


def on_ray(model, paths, out, workers, batch_size):
    from onnxcam.distributed import explain_dataset
    from onnxcam.model import load_model
    from onnxcam.preprocess import Preprocessing

    loaded = load_model(model)
    pre = Preprocessing.from_metadata(loaded.preprocess, loaded.input.shape)
    start = time.perf_counter()
    run = explain_dataset(loaded, paths, out, methods=["gradcam"], preprocessing=pre, workers=workers,
                          worker_threads=1, batch_size=batch_size, overwrite=True,
                          explainer_options=dict(layout=pre.layout,
                                                 input_shape=pre.probe_shape(loaded.input.shape)))
    assert not run.failed, run.failed
    return time.perf_counter() - start, len(run.results)


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
        batches = -(-len(paths) // args.batch_size)
        rows = {}
        rows["single, 1 thread"] = single(args.model, paths, work / "s1", 1, args.batch_size)
        rows[f"single, {args.cpus} threads"] = single(args.model, paths, work / "sN", args.cpus, args.batch_size)
        fixed_single = single(args.model, paths[: args.batch_size], work / "s1b", 1, args.batch_size)[0]
        fixed_ray = on_ray(args.model, paths[: args.batch_size], work / "r1b", 1, args.batch_size)[0]
        rows["ray, 1 worker"] = on_ray(args.model, paths, work / "r1", 1, args.batch_size)
        rows[f"ray, {args.cpus} workers"] = on_ray(args.model, paths, work / "rN", args.cpus, args.batch_size)
        for name, (seconds, count) in rows.items():
            assert count == len(paths), (name, count)
            print(f"{name:>22}: {seconds:7.2f} s  {len(paths) / seconds:7.1f} images/s")
        rate1 = len(paths) / rows["ray, 1 worker"][0]
        rate_n = len(paths) / rows[f"ray, {args.cpus} workers"][0]
        print(f"scaling efficiency, {args.cpus} workers vs 1: {rate_n / (args.cpus * rate1):.2f} "
              f"({rate_n / rate1:.2f}x)")
        print(f"ray vs single (1 thread each): {rows['single, 1 thread'][0] / rows['ray, 1 worker'][0]:.2f}x")
        per_batch = ((rows["ray, 1 worker"][0] - fixed_ray) - (rows["single, 1 thread"][0] - fixed_single)) \
            / max(1, batches - 1)
        print(f"ray fixed cost per run (one-batch run, over single-process): {fixed_ray - fixed_single:.2f} s; "
              f"per batch of {args.batch_size}: {per_batch * 1000:.0f} ms")
        same = all(same_pngs(work / "s1", work / d) for d in ("sN", "r1", "rN"))
        print(f"PNGs byte-equal across all runs: {same}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
