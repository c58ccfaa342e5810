"""Benchmark `onnxcam evaluate`'s deletion + insertion against torchcam 0.5.0's DeletionInsertionMetric,
and against the floor, in one process with the same threads.

Both tools compute Grad-CAM at EfficientNet-Lite0's last block (onnxcam node ``_blocks.15``, torchcam
``target_layer="_blocks.15"``) on the same pretrained weights and the same photos, then score the
deletion and insertion curves (``--steps`` intervals, zero baseline, softmax probability of the top
class) in batches of ``--batch-size``. The floor is the number of forward passes (the perturbed inputs
onnxcam scored, plus one per input for its map) times the per-image time of a plain ONNX Runtime
forward pass at that batch size. The tools and the plain forward take turns for ``--repeats`` rounds;
the best time of each counts (and
the median of the per-round ratios is printed too). It is a script, never a test.

    /work/venv-NN/bin/python tools/bench_evaluate.py            # needs torch, torchcam 0.5.0, skimage
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--copies", type=int, default=2, help="each of the 4 photos this many times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_path", help="also write the numbers here")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from torchcam.methods import GradCAM
    from torchcam.metrics import DeletionInsertionMetric

    import make_efficientnet
    from onnxcam import Explainer
    from onnxcam.evaluate import Evaluator

    torch.set_num_threads(args.threads)
    model_path = make_efficientnet.build(ROOT / ".cache" / "models" / "efficientnet_lite0.onnx")
    photos = make_efficientnet.example_photos()
    x = np.concatenate([make_efficientnet.preprocess_image(photos[name])
                        for name in ("chelsea", "coffee", "rocket", "astronaut")] * args.copies)
    n = len(x)

    evaluator = Evaluator(Explainer(str(model_path), "_blocks.15", threads=args.threads),
                          metrics=["deletion_auc", "insertion_auc"], steps=args.steps,
                          batch_size=args.batch_size)
    net = make_efficientnet.build_efficientnet_torch()
    extractor = GradCAM(net, target_layer="_blocks.15")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    plain = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_name = plain.get_inputs()[0].name
    batch = np.ascontiguousarray(np.resize(x, (args.batch_size, *x.shape[1:])))
    passes = 0

    def run_onnxcam():
        evaluator.forward_rows = 0
        results = evaluator.evaluate(x, "gradcam")
        return np.mean([r.values["deletion_auc"] for r in results]), np.mean([r.values["insertion_auc"] for r in results])

    def run_torchcam():
        metric = DeletionInsertionMetric(extractor, partial(torch.softmax, dim=-1), steps=args.steps,
                                         batch_size=args.batch_size)
        for lo in range(0, n, args.batch_size):
            metric.update(torch.from_numpy(x[lo:lo + args.batch_size]))
        summary = metric.summary()
        return summary["deletion_auc"], summary["insertion_auc"]

    def run_floor():
        """The plain forward over as many images as onnxcam's passes, in batches of batch_size."""
        for _ in range(-(-passes // args.batch_size)):
            plain.run(None, {input_name: batch})

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    run_onnxcam(), run_torchcam()                          # warm-up
    rows_scored = evaluator.forward_rows
    passes = rows_scored + n
    run_floor()
    rounds = []
    for _ in range(args.repeats):                          # turns, so all three see the same load
        t_ours, ours = timed(run_onnxcam)
        t_floor, _ = timed(run_floor)
        t_theirs, theirs = timed(run_torchcam)
        per_image = t_floor / (-(-passes // args.batch_size) * args.batch_size)
        rounds.append({"onnxcam_s": t_ours, "torchcam_s": t_theirs, "floor_s": passes * per_image,
                       "forward_per_image_ms": 1000 * per_image})
    best = {key: min(r[key] for r in rounds) for key in rounds[0]}
    floor = best["floor_s"]
    report = {"inputs": n, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
              "forward_passes": passes, **best,
              "speedup_vs_torchcam": best["torchcam_s"] / best["onnxcam_s"],
              "ratio_to_floor": best["onnxcam_s"] / floor,
              "median_round_speedup": statistics.median(r["torchcam_s"] / r["onnxcam_s"] for r in rounds),
              "median_round_ratio_to_floor": statistics.median(r["onnxcam_s"] / r["floor_s"] for r in rounds),
              "rounds": rounds,
              "onnxcam_auc": [float(v) for v in ours], "torchcam_auc": [float(v) for v in theirs]}
    best["onnxcam"], best["torchcam"] = best["onnxcam_s"], best["torchcam_s"]
    best["forward_per_image"] = best["forward_per_image_ms"] / 1000
    print(f"{n} inputs, {args.steps} steps, batch {args.batch_size}, {args.threads} threads: "
          f"{passes} forward passes ({rows_scored} perturbed + {n} maps)")
    print(f"onnxcam  {best['onnxcam']:.2f} s   torchcam {best['torchcam']:.2f} s   "
          f"-> {report['speedup_vs_torchcam']:.1f}x faster")
    print(f"floor    {floor:.2f} s ({report['forward_per_image_ms']:.2f} ms per image at batch "
          f"{args.batch_size}) -> onnxcam at {report['ratio_to_floor']:.2f}x the floor")
    print(f"median over {args.repeats} rounds: {report['median_round_speedup']:.1f}x faster, "
          f"{report['median_round_ratio_to_floor']:.2f}x the floor")
    print(f"deletion / insertion AUC: onnxcam {ours[0]:.6f} / {ours[1]:.6f}, torchcam {theirs[0]:.6f} / "
          f"{theirs[1]:.6f} (torchcam's own Grad-CAM maps)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
