"""Benchmark onnxcam against a plain ONNX Runtime forward pass and pytorch-grad-cam, in one run.

Each method runs in its own subprocess (same thread count everywhere) holding onnxcam, pytorch-grad-cam
and a plain ORT forward session of the same model. Every timed call is the second of two in a row (the
first untimed), so no tool is charged for the cache misses of the tool timed just before it. Peak
memory is each tool's rise of the process's resident high-water mark (reset between tools) over its first run, its set-up excluded, so it counts
what running costs (ORT arenas, masked batches). Times: the tools and the plain forward take turns for
``--repeats`` rounds after a warm-up, so all see the same machine load; the table gives the best
round (the median is in --json), batch-32 times per image.
Score-CAM runs on one image (its masks are batched 32 at a time inside): one warm-up run, then one
timed run (a single run is already hundreds of forward passes).

    bash tools/setup_bench.sh                     # .venv-bench: torch, torchvision, grad-cam 1.5.7
    .venv-bench/bin/python tools/bench.py --model efficientnet --json .cache/bench_efficientnet.json
    .venv-bench/bin/python tools/bench.py --model resnet50

Models: ``efficientnet`` (pretrained EfficientNet-Lite0 from tools/make_efficientnet.py, node
``_blocks.15`` = torch ``model._blocks[-1]``), ``resnet50`` (tools/resnet.py, seeded random weights,
node ``layer4`` = torch ``model.layer4[-1]``), or a path to any .onnx (onnxcam only, node ``auto``).
Methods: gradcam, layercam (each twice: maps from the NumPy engine and maps computed in the session),
``all`` (Explainer.explain_many of the applicable methods of `--method all` without Score-CAM, timed
against Grad-CAM alone in the same process), scorecam (its in-graph scorer; the number of distinct masks
it scored gives the floor; ``--scorecam-channels K`` for Faster Score-CAM).
``--cli`` also times one `onnxcam explain` call on one photo with a warm cache and prints one
``--profile`` line. On a machine other jobs load, ``--threads 1 --clock cpu`` measures the process's CPU
time, which their load barely moves; ratios in brackets pair each run with the forward pass timed just
before it.

    python tools/bench.py --model efficientnet --threads 1 --clock cpu --skip-torch
    python tools/bench.py --model resnet50 --threads 1 --clock cpu --scorecam-channels 256 --skip-torch
    python tools/bench.py --model efficientnet --methods gradcam,layercam,all --cli --skip-torch
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(ROOT))   # this checkout's onnxcam, whatever the environment has installed
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
GRADIENT_METHODS = ("gradcam", "layercam")
ALL_METHODS = ("gradcam", "layercam", "all", "scorecam")
SEVEN = ("cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam")   # --method all
TORCH_CLASSES = {"gradcam": "GradCAM", "layercam": "LayerCAM", "scorecam": "ScoreCAM"}


# ---- models -------------------------------------------------------------------------------------
def model_spec(name: str) -> dict:
    """Where the ONNX file is, how to make it, which node, and the torch twin (when there is one)."""
    if name == "resnet50":
        return {"name": name, "onnx": str(ROOT / ".cache/models/resnet50_random.onnx"), "node": "layer4",
                "make": [sys.executable, str(TOOLS / "resnet.py"), "--out",
                         str(ROOT / ".cache/models/resnet50_random.onnx")],
                "torch": "resnet50", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if name == "efficientnet":
        return {"name": name, "onnx": str(ROOT / "models/efficientnet_lite0.onnx"), "node": "_blocks.15",
                "make": [sys.executable, str(TOOLS / "make_efficientnet.py"), "--out",
                         str(ROOT / "models/efficientnet_lite0.onnx")],
                "torch": "efficientnet", "mean": None, "std": None}
    return {"name": Path(name).stem, "onnx": name, "node": "auto", "make": None, "torch": None,
            "mean": None, "std": None}


def ensure_model(spec: dict) -> None:
    if Path(spec["onnx"]).exists():
        return
    if spec["make"] is None or not Path(spec["make"][1]).exists():
        raise SystemExit(f"model {spec['onnx']} is missing and there is no tool to build it")
    print(f"building {spec['onnx']} ...", file=sys.stderr)
    subprocess.run(spec["make"], check=True, cwd=ROOT)


def torch_model(kind: str):
    sys.path.insert(0, str(TOOLS))
    if kind == "resnet50":
        from resnet import build_resnet50_torch
        model = build_resnet50_torch(seed=0)
        return model, [model.layer4[-1]]
    from make_efficientnet import build_efficientnet_torch
    model = build_efficientnet_torch()
    return model, [model._blocks[-1]]


def make_inputs(spec: dict, directory: Path) -> tuple[Path, Path]:
    """x1 (1 photo) and x32 (random crops of the four skimage photos), preprocessed as the model wants."""
    import numpy as np
    from skimage import data

    from onnxcam.preprocess import Preprocessing
    from onnxcam.model import load_model

    model = load_model(spec["onnx"])
    prep = Preprocessing.from_metadata(model.preprocess, model.input.shape)
    if spec["mean"] is not None and not model.preprocess:
        from dataclasses import replace
        prep = replace(prep, mean=spec["mean"], std=spec["std"])
    if prep.size is None:
        prep = Preprocessing(size=(224, 224), mean=prep.mean, std=prep.std, scale=prep.scale,
                             color=prep.color, layout=prep.layout)
    photos = [getattr(data, name)() for name in PHOTOS]
    photos = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=2) for p in photos]
    rng = np.random.default_rng(0)
    batch = [prep.apply(photos[0][..., :3])]
    while len(batch) < 32:
        photo = photos[len(batch) % len(photos)][..., :3]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        batch.append(prep.apply(np.ascontiguousarray(photo[top:top + side, left:left + side])))
    x32 = np.stack(batch).astype(np.float32)
    paths = directory / "x1.npy", directory / "x32.npy"
    np.save(paths[0], x32[:1])
    np.save(paths[1], x32)
    return paths


# ---- one measurement (runs in a fresh subprocess) -----------------------------------------------
def _reset_peak() -> float:
    """Start a new peak-memory window; returns the current resident size (MB).

    Linux resets the process's high-water mark (VmHWM) when "5" is written to /proc/self/clear_refs, so
    one process can measure several tools one after the other; elsewhere ru_maxrss is the fallback
    (then only the first window is exact)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(field)


def _peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(job: dict) -> dict:
    """For each tool: peak memory over its first run of each batch size (its set-up done before the
    window opens). Then timing: the tools and a plain ORT forward pass of the same model take turns,
    so all see the same machine load; the best and the median of ``repeats`` are kept."""
    import numpy as np

    global _clock
    threads, repeats = job["threads"], job["repeats"]
    _clock = CLOCK[job.get("clock", "wall")]
    inputs = job_inputs(job)
    slow = bool(job["method"]) and job["method"].startswith("scorecam")
    makers = {"ort": _ort_job, "onnxcam": _onnxcam_job, "graph": _onnxcam_job, "gradcam": _onnxcam_job,
              "torch": _torch_job}
    result, runs, samples = {}, {}, {}
    for tool in job["tools"]:
        runs[tool] = makers[tool](job, threads) if makers[tool] is not _onnxcam_job else \
            _onnxcam_job(job, threads, tool)
        entry = result[tool] = {"times": {}, "median": {}, "peak_mb": {}}
        samples[tool] = {b: [] for b in job["batches"]}
        for b in job["batches"]:
            baseline = _reset_peak()
            output = runs[tool](inputs[b])      # warm-up (first-run allocations), and the maps
            entry["peak_mb"][str(b)] = _peak_mb() - baseline
            if output is not None:
                maps, masks = output
                path = Path(job["out_dir"]) / f"{tool}_{job['method']}_{b}.npy"
                np.save(path, maps)
                entry.setdefault("maps", {})[str(b)] = str(path)
                if masks is not None:
                    entry.setdefault("masks_per_image", {})[str(b)] = masks
    forward = _ort_job(job, threads)
    forward_samples = {b: [] for b in (1, 32)}
    for b in (1, 32):
        forward(inputs[b])
    paired = {tool: {b: [] for b in job["batches"]} for tool in runs}
    for round_ in range(repeats):
        for tool in runs:
            if not slow or round_ == 0:      # Score-CAM: one timed run after the warm-up
                for b in job["batches"]:
                    # a forward pass right before each run: their ratio is robust to slow load drifts
                    reference = _seconds(forward, inputs[b])
                    forward_samples[b].append(reference)
                    samples[tool][b].append(_seconds(runs[tool], inputs[b], warm=not slow))
                    paired[tool][b].append(samples[tool][b][-1] / reference)
        for b in (1, 32):
            forward_samples[b].append(_seconds(forward, inputs[b]))
    forward_best = {str(b): min(v) for b, v in forward_samples.items()}
    for tool, per_batch in samples.items():
        for b, values in per_batch.items():
            result[tool]["times"][str(b)] = min(values)
            result[tool]["median"][str(b)] = statistics.median(values)
            result[tool].setdefault("paired_median", {})[str(b)] = statistics.median(paired[tool][b])
        result[tool]["forward"] = forward_best
        result[tool]["forward_median"] = {str(b): statistics.median(v) for b, v in forward_samples.items()}
    if job.get("all_methods"):
        result["all_methods"] = job["all_methods"]
    return result


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _seconds(fn, x, warm: bool = True) -> float:
    # Let the previous call's thread pools (another ORT session's, torch's OpenMP) stop spinning, so
    # short batch-1 runs are not charged for the CPU time of the call before them. Then one untimed
    # call: each tool holds its own copy of the weights, and the tool timed just before has pushed
    # them out of the CPU caches; the timed call is the second in a row, as in any run over a dataset.
    time.sleep(0.05)
    if warm:
        fn(x)
    start = _clock()
    fn(x)
    return _clock() - start


def _ort_job(job, threads):
    from onnxcam.model import load_model
    from onnxcam.runtime import Runner

    model = load_model(job["onnx"])
    runner = Runner(model.proto, [model.outputs[0].name], "cpu", threads)

    def run(x):
        runner.run({model.input.name: x})
    return run


def _onnxcam_job(job, threads, tool="onnxcam"):
    """tool ``onnxcam``: maps from the NumPy engine; ``graph``: maps computed in the session;
    ``gradcam``: Grad-CAM alone (the yardstick of method ``all``) with the engine ``all`` uses."""
    from onnxcam import Explainer

    method = job["method"]
    maps = {"onnxcam": "numpy", "graph": "graph"}.get(tool, job.get("all_maps", "auto"))
    if method == "all" and tool == "onnxcam":
        maps = job.get("all_maps", "auto")
    explainer = Explainer(job["onnx"], job["node"], provider="cpu", threads=threads, maps=maps)
    if method == "all" or tool == "gradcam":
        methods = [m for m in SEVEN if _applies(explainer, m)] if tool != "gradcam" else ["gradcam"]
        explainer.explain_many(job_inputs(job)[1], methods)      # sessions built before the baseline
        job.setdefault("all_methods", methods)
        return lambda x: (explainer.explain_many(x, methods)[methods[0]].maps, None)
    if method in GRADIENT_METHODS:
        explainer.explain(job_inputs(job)[1], method=method)     # session built before the memory baseline
        return lambda x: (explainer.explain(x, method=method).maps, None)
    explainer.forward_session()
    scorer = explainer.scorecam.in_graph_scorer()      # the in-graph scorer Explainer.explain uses

    def run(x):
        before = scorer.masks_scored if scorer else 0
        maps = explainer.explain(x, method="scorecam", batch_size=32, max_channels=job.get("max_channels")).maps
        return maps, (scorer.masks_scored - before) / len(x) if scorer else None
    return run


def _applies(explainer, method: str) -> bool:
    from onnxcam import OnnxcamError
    try:
        explainer.check_method(method)
        return True
    except OnnxcamError:
        return False


def job_inputs(job) -> dict:
    import numpy as np
    if "_inputs" not in job:
        job["_inputs"] = {b: np.load(job[f"x{b}"]) for b in (1, 32)}
    return job["_inputs"]


def _torch_job(job, threads):
    import pytorch_grad_cam
    import torch

    torch.set_num_threads(threads)
    model, layers = torch_model(job["torch"])
    cam = getattr(pytorch_grad_cam, TORCH_CLASSES[job["method"]])(model=model, target_layers=layers)
    cam.batch_size = 32   # ScoreCAM's masked-input batch (its default is 16); onnxcam uses 32 too

    def run(x):
        return cam(input_tensor=torch.from_numpy(x), targets=None), None
    return run


def run_job(job: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
               OPENBLAS_NUM_THREADS=str(job["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report ---------------------------------------------------------------------------------------
def _ms(seconds) -> str:
    return "—" if seconds is None else (f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s")


def _ratio(a, b) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def _time(result: dict, batch: int):
    t = result.get("times", {}).get(str(batch))
    return None if t is None else t / batch


def _max_diff(a: dict, b: dict, batch: int):
    import numpy as np
    pa, pb = a.get("maps", {}).get(str(batch)), b.get("maps", {}).get(str(batch))
    if not pa or not pb:
        return None
    x, y = np.load(pa), np.load(pb)
    return float(np.abs(x - y).max()) if x.shape == y.shape else float("nan")


def report(spec: dict, results: dict, threads: int, clock: str = "wall") -> tuple[str, dict]:
    forward = results["ort"]
    f1, f32 = _time(forward, 1), _time(forward, 32)
    lines = [f"### {spec['name']} — node `{spec['node']}`, {threads} threads, {clock} clock",
             "",
             f"Plain ORT forward: batch 1 {_ms(f1)}, batch 32 {_ms(f32)} per image; "
             f"peak memory +{forward['peak_mb'].get('1', 0):.0f} / +{forward['peak_mb'].get('32', 0):.0f} MB",
             "",
             "Times are the best of the repeats (the median is in --json); ×fwd compares with a plain forward "
             "pass timed alternately in the same process: best / best, and in brackets the median over "
             "rounds of (run / the forward pass timed just before it). Score-CAM: one image, one run.",
             "",
             "| method | onnxcam b1 | ×fwd b1 | onnxcam b32 /img | ×fwd b32 | peak MB b1/b32 | "
             "pytorch-grad-cam b1 | b32 /img | speed-up b1 | b32 | max map diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {"forward_b1_s": f1, "forward_b32_per_image_s": f32, "methods": {}}
    for method, (ours, theirs) in results["methods"].items():
        if "error" in ours:
            lines.append(f"| {method} | error: {ours['error'][:120]} |" + " |" * 10)
            continue
        o1, o32 = _time(ours, 1), _time(ours, 32)
        g1, g32 = ours["forward"]["1"], ours["forward"]["32"] / 32   # forward interleaved with the method
        t1, t32 = (_time(theirs, 1), _time(theirs, 32)) if theirs and "error" not in theirs else (None, None)
        diffs = [d for d in (_max_diff(ours, theirs or {}, 1), _max_diff(ours, theirs or {}, 32)) if d is not None]
        peak = ours["peak_mb"]
        torch_b1 = _ms(t1) if theirs and "error" not in theirs else (theirs or {}).get("error", "—")[:60]
        diff_text = f"{max(diffs):.2e}" if diffs else "—"
        pm = ours.get("paired_median", {})
        p1 = f" ({pm['1']:.2f}×)" if "1" in pm else ""
        p32 = f" ({pm['32']:.2f}×)" if "32" in pm else ""
        lines.append(f"| {method} | {_ms(o1)} | {_ratio(o1, g1)}{p1} | {_ms(o32)} | {_ratio(o32, g32)}{p32} | "
                     f"{peak.get('1', 0):.0f} / {peak.get('32', 0):.0f} | {torch_b1} | {_ms(t32)} | "
                     f"{_ratio(t1, o1)} | {_ratio(t32, o32)} | {diff_text} |")
        entry = {"median_s": ours.get("median"), "onnxcam_b1_s": o1, "onnxcam_b32_per_image_s": o32, "forward_b1_s": g1,
                 "forward_b32_per_image_s": g32, "vs_forward_b1": o1 / g1 if o1 else None,
                 "paired_median_vs_forward": pm,
                 "vs_forward_b32": o32 / g32 if o32 else None, "torch_b1_s": t1,
                 "torch_b32_per_image_s": t32, "peak_mb": peak, "max_map_diff": max(diffs) if diffs else None}
        masks = ours.get("masks_per_image", {}).get("1")
        if masks is not None:
            floor = masks * g32
            median32 = ours.get("forward_median", {}).get("32")
            floor_median = masks * median32 / 32 if median32 else None
            entry.update(distinct_masks=masks, floor_s=floor, vs_floor=o1 / floor, floor_median_s=floor_median,
                         vs_floor_median=o1 / floor_median if floor_median else None)
            lines.append(f"|   ↳ {method}: {masks:.0f} distinct masks × {_ms(g32)} = {_ms(floor)} floor; "
                         f"onnxcam {_ratio(o1, floor)} of it ({_ratio(o1, floor_median)} of the floor from the "
                         "median forward: one Score-CAM run meets the median load, not the best) |" + " |" * 10)
        summary["methods"][method] = entry
    if results.get("all_methods"):
        ours = results["methods"].get(next(k for k in results["methods"] if k.startswith("all (")))[0]
        alone = results["methods"].get("gradcam alone (same engine)")[0]
        if ours and alone and "error" not in ours and "error" not in alone:
            lines.append(f"|   ↳ all = {', '.join(results['all_methods'])} ({len(results['all_methods'])} methods, "
                         f"one run): {_ratio(_time(ours, 1), _time(alone, 1))} Grad-CAM alone at b1, "
                         f"{_ratio(_time(ours, 32), _time(alone, 32))} at b32 |" + " |" * 10)
            summary["all_vs_gradcam"] = {"b1": _time(ours, 1) / _time(alone, 1),
                                         "b32": _time(ours, 32) / _time(alone, 32),
                                         "methods": results["all_methods"]}
    return "\n".join(lines), summary


def cli_report(spec: dict, args) -> tuple[str, dict]:
    """Wall time of one `onnxcam explain` call on one photo with a warm cache (Grad-CAM and --method all),
    each repeated --repeats times in turns, and one --profile breakdown of the fastest kind."""
    import numpy as np
    from skimage import data
    import cv2

    out = {}
    with tempfile.TemporaryDirectory(prefix="onnxcam-cli-") as tmp:
        photo = Path(tmp) / "chelsea.png"
        cv2.imwrite(str(photo), np.ascontiguousarray(data.chelsea()[..., ::-1]))
        env = dict(os.environ, ONNXCAM_CACHE_DIR=str(Path(tmp) / "cache"), ONNXCAM_THREADS=str(args.threads),
                   PYTHONPATH=str(ROOT))
        # an installed onnxcam has its bytecode compiled; let the cold run below write it here too
        # (PYTHONDONTWRITEBYTECODE would charge every timed call for compiling onnxcam's sources)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        node = [] if spec["node"] == "auto" else ["--node", spec["node"]]
        maps = [] if args.cli_maps == "auto" else ["--maps", args.cli_maps]
        from onnxcam import Explainer
        explainer = Explainer(spec["onnx"], spec["node"], provider="cpu")
        seven = ",".join(m for m in SEVEN if _applies(explainer, m))    # --method all without Score-CAM
        kinds = {"gradcam": ["--method", "gradcam"], "all": ["--method", seven]}

        def command(kind, *extra):
            return [sys.executable, "-m", "onnxcam.cli", "explain", str(Path(spec["onnx"]).resolve()), str(photo), *node,
                    *kinds[kind], *maps, "--out", str(Path(tmp) / kind), "--overwrite", *extra]

        for kind in kinds:       # cold run: fills the cache
            subprocess.run(command(kind), check=True, capture_output=True, env=env, cwd=tmp)
        times = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                start = time.perf_counter()
                subprocess.run(command(kind), check=True, capture_output=True, env=env, cwd=tmp)
                times[kind].append(time.perf_counter() - start)
        profile = subprocess.run(command("gradcam", "--profile"), check=True, capture_output=True, text=True,
                                 env=env, cwd=tmp).stderr.strip().splitlines()[-1]
    lines = [f"`onnxcam explain` on one photo, warm cache, {args.threads} threads ({args.repeats} runs each, "
             "in turns): best / median wall", ""]
    for kind, values in times.items():
        out[kind] = {"best_s": min(values), "median_s": statistics.median(values), "args": kinds[kind] + maps}
        lines.append(f"- `{' '.join(kinds[kind] + maps)}`: {min(values):.3f} s / {statistics.median(values):.3f} s")
    lines += ["", f"`--profile` (Grad-CAM): {profile}"]
    out["profile"] = profile
    return "\n".join(lines), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="onnxcam benchmark (see the module docstring)")
    parser.add_argument("--model", default="efficientnet", help="efficientnet | resnet50 | PATH.onnx")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-torch", action="store_true", help="do not run pytorch-grad-cam")
    parser.add_argument("--torch-scorecam", choices=("auto", "yes", "no"), default="auto",
                        help="pytorch-grad-cam Score-CAM (auto: EfficientNet only; ResNet-50 takes minutes)")
    parser.add_argument("--node", help="explain this node instead of the model's last block (e.g. an early "
                        "one, to see the cost of a deep backward pass); pytorch-grad-cam is then skipped")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--all-maps", choices=("auto", "graph", "numpy"), default="auto",
                        help="maps engine for method `all` and its Grad-CAM yardstick")
    parser.add_argument("--cli", action="store_true", help="also time `onnxcam explain` on one photo "
                        "(warm cache), interleaved --repeats times, with one --profile breakdown")
    parser.add_argument("--scorecam-channels", type=int, help="Score-CAM with --max-channels K (Faster "
                        "Score-CAM: fewer masks, the same floor ratio, minutes less on ResNet-50)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time (use with --threads 1: on a "
                             "machine other jobs load, CPU time of one thread barely moves with their load)")
    parser.add_argument("--cli-maps", choices=("auto", "graph", "numpy"), default="auto",
                        help="--maps for the --cli runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    spec = model_spec(args.model)
    if args.node:
        spec = dict(spec, node=args.node, torch=None)    # the torch twin's layer is the last block's
    ensure_model(spec)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_METHODS)}")
    use_torch = spec["torch"] is not None and not args.skip_torch
    if use_torch:
        try:
            import pytorch_grad_cam  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            print("pytorch-grad-cam / torch not importable here: onnxcam only "
                  "(run with .venv-bench/bin/python after tools/setup_bench.sh)", file=sys.stderr)
            use_torch = False
    with tempfile.TemporaryDirectory(prefix="onnxcam-bench-") as tmp:
        x1, x32 = make_inputs(spec, Path(tmp))
        base = {"onnx": spec["onnx"], "node": spec["node"], "torch": spec["torch"], "threads": args.threads,
                "clock": args.clock,
                "repeats": args.repeats, "x1": str(x1), "x32": str(x32), "out_dir": tmp}
        print(f"[{spec['name']}] ORT forward ...", file=sys.stderr)
        forward = run_job(dict(base, tools=["ort"], method=None, batches=[1, 32]))
        if "error" in forward:
            raise SystemExit(f"plain forward failed: {forward['error']}")
        results = {"ort": forward["ort"], "methods": {}}
        torch_scorecam = (args.torch_scorecam == "yes" or (args.torch_scorecam == "auto"
                                                          and spec["torch"] == "efficientnet")) \
            and not args.scorecam_channels      # pytorch-grad-cam has no Faster Score-CAM
        torch_done = {}
        for method in methods:
            batches = [1] if method.startswith("scorecam") else [1, 32]
            torch_class = TORCH_CLASSES.get(method)
            tools = ["onnxcam", "gradcam"] if method == "all" else ["onnxcam"]
            if method in GRADIENT_METHODS:
                tools.append("graph")      # the same method with its maps computed in the session
            if use_torch and torch_class and torch_class not in torch_done and (
                    not method.startswith("scorecam") or torch_scorecam):
                tools.append("torch")
            print(f"[{spec['name']}] {' + '.join(tools)} {method} ...", file=sys.stderr)
            got = run_job(dict(base, tools=tools, method=method, batches=batches, all_maps=args.all_maps,
                               max_channels=args.scorecam_channels))
            if "error" in got:
                got = {tool: got for tool in tools}
            if "torch" in got:
                torch_done[torch_class] = got["torch"]
            if method == "all":
                results["methods"][f"all ({args.all_maps} maps)"] = (got["onnxcam"], None)
                results["methods"]["gradcam alone (same engine)"] = (got["gradcam"], None)
                results["all_methods"] = got.get("all_methods")
                continue
            label = f"{method} (NumPy maps)" if method in GRADIENT_METHODS else method
            results["methods"][label] = (got["onnxcam"], torch_done.get(torch_class))
            if "graph" in got:
                results["methods"][f"{method} (in-graph maps)"] = (got["graph"], torch_done.get(torch_class))
        table, summary = report(spec, results, args.threads, args.clock)
        if args.cli:
            cli_table, summary["cli"] = cli_report(spec, args)
            table += "\n\n" + cli_table
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": spec["name"], "node": spec["node"],
                                               "threads": args.threads, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
