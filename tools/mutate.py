"""Mutation check: does the suite catch small deliberate bugs? Not part of CI.

Each mutation replaces one exact piece of onnxcam's source (it must occur exactly once) in a fresh copy
of the repository (a temp folder: tracked and untracked-but-not-ignored files, the built EfficientNet
models linked in, an empty test cache), runs the test files that guard that code in each named
environment, and counts the mutation caught when some test fails. A baseline run on the unmutated copy
must pass first. Prints a Markdown table.

    python tools/mutate.py                       # every mutation, both environments where listed
    python tools/mutate.py --only std-multiplied,bgr-ignored
    python tools/mutate.py --venv /work/main/.venv --training-venv /work/main/.venv-training
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    area: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    training: bool = False           # also run in the onnxruntime-training environment


M = Mutation
PRE = ("tests/test_preprocess_render.py",)
CLI = ("tests/test_cli.py",)
MAPS = ("tests/test_maps_graph.py",)
MUTATIONS = [
    # preprocessing
    M("std-multiplied", "preprocessing", "onnxcam/preprocess.py",
      "/ np.asarray(self.std, np.float32)", "* np.asarray(self.std, np.float32)", PRE),
    M("mean-ignored", "preprocessing", "onnxcam/preprocess.py",
      "x = (x - np.asarray(self.mean, np.float32))", "x = (x - 0 * np.asarray(self.mean, np.float32))", PRE),
    M("bgr-flag-ignored", "preprocessing", "onnxcam/cli/options.py",
      'fields["color"] = "BGR"', 'fields["color"] = base.color', PRE),
    M("bgr-apply-ignored", "preprocessing", "onnxcam/preprocess.py",
      'image = rgb if self.color == "RGB" else rgb[..., ::-1]', "image = rgb", PRE),
    M("size-swapped", "preprocessing", "onnxcam/preprocess.py",
      "(self.size[1], self.size[0]), interpolation", "(self.size[0], self.size[1]), interpolation", PRE),
    M("nchw-transposed-wrong", "preprocessing", "onnxcam/preprocess.py",
      "np.transpose(x, (2, 0, 1))", "np.transpose(x, (2, 1, 0))", PRE),
    M("metadata-std-ignored", "preprocessing", "onnxcam/preprocess.py",
      'for key in ("mean", "std"):', 'for key in ("mean",):', PRE),
    M("read-image-bgr", "preprocessing", "onnxcam/preprocess.py",
      "cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)", "pass", PRE),
    M("sixteen-bit-truncated", "preprocessing", "onnxcam/preprocess.py",
      "np.rint(image / 257.0)", "(image >> 8)", PRE),
    # rendering
    M("overlay-one-minus-map", "rendering", "onnxcam/render.py",
      "cam = np.clip(np.nan_to_num(np.asarray(cam, np.float32), nan=0.0), 0.0, 1.0)",
      "cam = 1.0 - np.clip(np.nan_to_num(np.asarray(cam, np.float32), nan=0.0), 0.0, 1.0)", PRE),
    M("overlay-alpha-swapped", "rendering", "onnxcam/render.py",
      "1.0 - alpha, heat, alpha, 0.0, dst=out[part])", "alpha, heat, 1.0 - alpha, 0.0, dst=out[part])", PRE),
    M("overlay-rows-flipped", "rendering", "onnxcam/render.py",
      "position = np.clip((np.arange(height, dtype=np.float64) + 0.5)",
      "position = np.clip((np.arange(height, dtype=np.float64)[::-1] + 0.5)", PRE + CLI),
    M("jet-left-bgr", "rendering", "onnxcam/render.py",
      "return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)",
      "return cv2.applyColorMap(scaled, cv2.COLORMAP_JET)", PRE),
    M("render-1d-band-reversed", "rendering", "onnxcam/render.py",
      "canvas[-24:] = np.repeat(band, 24, axis=0)", "canvas[-24:] = np.repeat(band[:, ::-1], 24, axis=0)", PRE),
    # outputs
    M("outputs-written-in-place", "outputs", "onnxcam/outputs.py",
      "        return write_atomic(path, [data])",
      '        with open(path, "wb") as handle:\n            handle.write(data)\n        return path',
      ("tests/test_atomic_writes.py",) + CLI),
    M("atomic-tmp-not-removed", "outputs", "onnxcam/atomic.py",
      "        try:\n            os.unlink(tmp)\n        except OSError:\n            pass\n        raise",
      "        raise", ("tests/test_atomic_writes.py",)),
    M("out-writable-check-removed", "outputs", "onnxcam/outputs.py",
      "if not os.access(path, os.W_OK | os.X_OK):", "if False:", CLI),
    M("inputs-not-protected", "outputs", "onnxcam/outputs.py",
      "if path.resolve() in protected:", "if False:", CLI),
    # cache
    M("cache-written-in-place", "cache", "onnxcam/cache.py",
      "        write_atomic(path, [_MAGIC, _check_bytes(payload), payload])",
      '        with open(path, "wb") as handle:\n'
      '            for chunk in [_MAGIC, _check_bytes(payload), payload]:\n'
      '                handle.write(chunk)', ("tests/test_atomic_writes.py", "tests/test_cache.py")),
    M("cache-key-ignores-request", "cache", "onnxcam/cache.py",
      "request = dict(parts, onnxcam_version=_version())", "request = dict(onnxcam_version=_version())",
      ("tests/test_cache.py",)),
    M("cache-checksum-unchecked", "cache", "onnxcam/cache.py",
      "if _check_bytes(payload) != data[len(_MAGIC):_HEADER]:", "if False:", ("tests/test_cache.py",)),
    M("cache-bytes-past-the-cap", "cache", "onnxcam/cache.py",
      "    if len(payload) > min(MAX_CACHED_BYTES, limit) or not _write(path, payload):\n        return False\n"
      "    cache_limits.evict(path.parent, keep=path, limit=limit)",
      "    if len(payload) > MAX_CACHED_BYTES or not _write(path, payload):\n        return False",
      ("tests/test_cache.py",)),
    M("legrad-cache-ignores-block", "cache", "onnxcam/legrad.py",
      '"block": [block.scope, block.output, block.attention]', '"block": []', ("tests/test_legrad.py",)),
    M("ray-workers-ignore-detection", "outputs", "onnxcam/distributed.py",
      "self.runner = file_runner(explainer, preprocessing, out_dir, methods, detection,",
      "self.runner = file_runner(explainer, preprocessing, out_dir, methods, None,",
      ("tests/test_distributed.py",)),
    M("export-augmented-drops-feeds", "outputs", "onnxcam/cli/models.py",
      "False, feed_specs, output_name, class_axis", "False, (), output_name, class_axis",
      ("tests/test_any_export.py",)),
    M("entry-point-exit-code-lost", "errors", "onnxcam/cli/app.py", "    os._exit(code)", "    os._exit(0)",
      ("tests/test_profile.py",)),
    # errors
    M("external-data-check-removed", "errors", "onnxcam/model.py",
      "    if not target.exists():\n        raise OnnxcamError(", "    if False:\n        raise OnnxcamError(", CLI),
    M("external-data-message-lost", "errors", "onnxcam/model.py",
      '"copy it next to the model")', '"")', CLI),
    M("unreadable-model-message-lost", "errors", "onnxcam/model.py",
      '"pass a .onnx file exported from your framework"', '""', CLI),
    M("close-matches-lost", "errors", "onnxcam/nodes.py",
      "hint = f\"; closest: {', '.join(closest)}\" if closest else \"\"", 'hint = ""', CLI),
    M("close-matches-last-component-only", "errors", "onnxcam/nodes.py",
      "closest = difflib.get_close_matches(spec, sorted(names), n=5, cutoff=0.5)", "closest = []", CLI),
    M("target-range-unchecked", "errors", "onnxcam/targets.py",
      "bad = array[(array < 0) | (array >= num_classes)]", "bad = array[array < 0]", CLI),
    # targets
    M("scorecam-sample0-mask", "targets", "onnxcam/scorecam.py",
      "None if planes is None else planes[i, targets[i]]", "None if planes is None else planes[0, targets[0]]",
      ("tests/test_segmentation_targets.py",)),
    M("gradient-sample0-mask", "targets", "onnxcam/explainer.py",
      "part_mask = mask[lo:lo + step] if per_sample_mask else mask",
      "part_mask = np.repeat(mask[:1], len(x[lo:lo + step]), 0) if per_sample_mask else mask",
      ("tests/test_segmentation_targets.py",)),
    # methods
    M("layercam-no-relu-on-gradient", "methods", "onnxcam/methods/gradient_based.py",
      "return relu((relu(G) * A).sum(axis=1)).astype(np.float32)", "return relu((G * A).sum(axis=1)).astype(np.float32)",
      ("tests/test_methods.py", "tests/test_torch_reference.py")),
    M("normalize-no-min", "methods", "onnxcam/methods/postprocess.py",
      "    flat -= flat.min(axis=1, keepdims=True)\n", "", ("tests/test_methods.py", "tests/test_torch_reference.py")),
    M("scorecam-graph-no-min-subtraction", "methods", "onnxcam/scorecam.py",
      'masks = b.op("Div", [b.op("Sub", [up, low]), value_range])', 'masks = b.op("Div", [up, value_range])',
      ("tests/test_scorecam_graph.py",)),
    M("scorecam-softmax-unshifted-sum", "methods", "onnxcam/methods/scorecam.py",
      "return shifted / shifted.sum()", "return scores / scores.sum()",
      ("tests/test_scorecam.py", "tests/test_scorecam_graph.py")),
    # gradient rules
    M("relu-gate-inverted", "gradient rules", "onnxcam/gradients/rules/elementwise.py",
      'return [e.op("Mul", [e.compact(gy[0]), _mask(e, e.op("Greater", [y, e.scalar(0.0, y)]), y)])]',
      'return [e.op("Mul", [e.compact(gy[0]), _mask(e, e.op("Less", [y, e.scalar(0.0, y)]), y)])]',
      ("tests/test_portable_rules.py",)),
    M("clip-upper-bound-ignored", "gradient rules", "onnxcam/gradients/rules/elementwise.py",
      'for bound, op_type in ((low, "Greater"), (high, "Less")):', 'for bound, op_type in ((low, "Greater"),):',
      ("tests/test_portable_rules.py",)),
    M("gemm-transB-ignored", "gradient rules", "onnxcam/gradients/rules/linear.py",
      "ga = gemm_op(B, g, tb, 1) if ta else gemm_op(g, B, 0, 1 - tb)",
      "ga = gemm_op(B, g, tb, 1) if ta else gemm_op(g, B, 0, 1)", ("tests/test_portable_rules.py",),
      training=True),
    # canonicalisation for onnxruntime-training's gradient builder
    M("batchnorm-fold-without-epsilon", "gradient rules", "onnxcam/gradients/canonical/normalization.py",
      "scale_values = g / np.sqrt(v + eps)", "scale_values = g / np.sqrt(v)",
      ("tests/test_canonicalize.py", "tests/test_ort_training.py"), training=True),
    M("dropout-kept-in-training-graph", "gradient rules", "onnxcam/gradients/canonical/activations.py",
      'nodes = [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=rw.name(node, "Identity"))]',
      "return None", ("tests/test_canonicalize.py", "tests/test_ort_training.py"), training=True),
    M("lstm-cell-state-gradient-not-forgotten", "gradient rules", "onnxcam/gradients/rules/recurrent.py",
      'return d_pre, o.matmul(d_pre, w["R"]), o.mul(dc, k["f"])', 'return d_pre, o.matmul(d_pre, w["R"]), dc',
      ("tests/test_portable_recurrent.py",)),
    M("gru-linear-before-reset-gate-wrong", "gradient rules", "onnxcam/gradients/rules/recurrent.py",
      'Fr = o.mul(s["q"] if self.lbr else s["h"]', 'Fr = o.mul(s["h"] if self.lbr else s["h"]',
      ("tests/test_portable_recurrent.py",)),
    M("padding-steps-drop-the-held-state", "gradient rules", "onnxcam/gradients/rules/recurrent.py",
      "gh = s.add(gh, held)", "gh = gh", ("tests/test_portable_recurrent.py",)),
    M("reverse-direction-run-forwards", "gradient rules", "onnxcam/gradients/rules/recurrent.py",
      "scanned + masks, 1, not backwards)", "scanned + masks, 1, True)",
      ("tests/test_portable_recurrent.py",)),
    M("reverse-padding-starts-from-zero", "gradient rules", "onnxcam/gradients/rules/recurrent.py",
      "return o.add(o.mul(m_next, later), o.mul(o.one_minus(m_next), first))", "return later",
      ("tests/test_portable_recurrent.py",)),
    M("auto-advice-circular", "gradient backends", "onnxcam/gradients/__init__.py",
      "raise OnnxcamError(neither_backend_message(missing, failure.reason)) from None",
      "raise OnnxcamError(str(failure)) from None", ("tests/test_auto_backend.py",), training=True),
    # performance round two: the exact shortcuts of the gradient and maps graphs, the warm path
    M("target-rows-take-the-logits-argmax-always", "maps graph", "onnxcam/maps_graph.py",
      'target = b.op("Where", [given, b.op("ArgMax", [TARGET_WEIGHTS], axis=1, keepdims=0),',
      'target = b.op("Where", [given, b.op("ArgMax", [logits], axis=1, keepdims=0),', MAPS),
    M("target-columns-not-transposed", "maps graph", "onnxcam/maps_graph.py",
      'b.op("Transpose", [b.op("Gather", [matrix, target], axis=1)], outputs=[node.output[0]], perm=[1, 0])',
      'b.op("Gather", [matrix, target], outputs=[node.output[0]], axis=0)', MAPS),
    M("pointwise-mean-takes-the-max", "maps graph", "onnxcam/maps_graph.py",
      'pooled = self.spatial_mean(conv.input[0])',
      'pooled = self.reduce("ReduceMax", conv.input[0], _SPATIAL, 1)', MAPS),
    M("pointwise-conv-accepts-any-kernel", "maps graph", "onnxcam/maps_graph.py",
      "if kernel is None or list(kernel) != [1, 1]:", "if kernel is None:", MAPS + ("tests/test_explain_many.py",)),
    M("interpolation-weights-swapped", "maps graph", "onnxcam/methods/interpolation.py",
      "np.add.at(matrix, (rows, i0), np.float32(1) - t)", "np.add.at(matrix, (rows, i0), t)",
      MAPS + ("tests/test_scorecam_graph.py",)),
    M("gap-compact-gradient-not-averaged", "gradient rules", "onnxcam/gradients/rules/pooling.py",
      'e.op("Mul", [gy[0], e.scalar(1.0 / float(np.prod(spatial)), x)]))]',
      'gy[0])]', ("tests/test_portable_rules.py", "tests/test_portable_torch.py") + MAPS),
    M("ones-seed-shortcut-on-any-gradient", "gradient rules", "onnxcam/gradients/rules/elementwise.py",
      "return other if e.is_ones(gy[0]) else", "return other if True else",
      ("tests/test_portable_rules.py", "tests/test_portable_graphs.py")),
    M("pruning-drops-needed-nodes", "gradient rules", "onnxcam/graph.py",
      "        needed.update(i for i in node.input if i)\n", "",
      ("tests/test_portable_rules.py", "tests/test_explainer.py")),
    M("folded-pads-ignored", "shapes", "onnxcam/graph.py",
      'SHAPE_INPUTS = {"Pad": (1, 3),', 'SHAPE_INPUTS = {"Pad": (),', ("tests/test_nodes.py",)),
    M("cache-checksum-ignored", "cache", "onnxcam/cache.py",
      "if _check_bytes(payload) != data[len(_MAGIC):_HEADER]:", "if False:", ("tests/test_cache.py",)),
    M("warm-maps-parse-the-gradient-model", "cache", "onnxcam/maps_graph.py",
      'if e.gradients.generic_backend() != "portable":',
      'if e.gradients.build(x)[1].backend != "portable":', ("tests/test_explainer.py",)),
    M("scorecam-matrices-half-pixel", "score-cam", "onnxcam/scorecam.py",
      "rows = interpolation_matrix(map_size[0], input_size[0], align_corners=True)",
      "rows = interpolation_matrix(map_size[0], input_size[0], align_corners=False)",
      ("tests/test_scorecam_graph.py", "tests/test_scorecam.py")),
    M("mean-through-any-product", "in-graph maps", "onnxcam/maps_graph.py",
      "return shape is not None and len(shape) <= 4 and all(d == 1 for d in shape[-2:])",
      "return shape is not None and len(shape) <= 4", MAPS),
    M("json-facts-uncapped", "cache", "onnxcam/cache.py",
      "    _store(path, json.dumps(value).encode())", "    _write(path, json.dumps(value).encode())",
      ("tests/test_cache.py",)),
    M("eigencam-threads-ignored", "methods", "onnxcam/methods/eigencam.py",
      "workers = min(len(A), threads or available_cpus())", "workers = min(len(A), available_cpus())",
      ("tests/test_methods.py",)),
]


def copy_repo(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    models = ROOT / ".cache" / "models"
    if models.is_dir():
        (dest / ".cache").mkdir(exist_ok=True)
        os.symlink(models, dest / ".cache" / "models")      # built models are inputs, not under test


def run_tests(copy: Path, python: str, tests: tuple[str, ...]) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(copy))
    env.pop("ONNXCAM_CACHE_DIR", None)
    start = time.time()
    done = subprocess.run([python, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines() or [""]
    failed = [line.split()[1] for line in lines if line.startswith("FAILED ")]
    tail = lines[-1].strip("= ")
    if failed:
        tail = f"{failed[0].split('/')[-1]}: {tail}"
    return done.returncode, time.time() - start, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv"))
    parser.add_argument("--training-venv", default=str(ROOT / ".venv-training"))
    parser.add_argument("--only", help="comma-separated mutation names")
    args = parser.parse_args()
    chosen = MUTATIONS if not args.only else [m for m in MUTATIONS if m.name in args.only.split(",")]
    pythons = {"onnxruntime": str(Path(args.venv) / "bin" / "python")}
    if Path(args.training_venv, "bin", "python").exists():
        pythons["ort-training"] = str(Path(args.training_venv) / "bin" / "python")

    with tempfile.TemporaryDirectory(prefix="onnxcam-mutate-") as tmp:
        base = Path(tmp) / "baseline"
        copy_repo(base)
        tests = tuple(sorted({t for m in chosen for t in m.tests}))
        rc, seconds, tail = run_tests(base, pythons["onnxruntime"], tests)
        print(f"baseline ({len(tests)} test files): rc={rc} {tail} [{seconds:.0f} s]", file=sys.stderr)
        training_tests = tuple(sorted({t for m in chosen if m.training for t in m.tests}))
        if rc == 0 and training_tests and "ort-training" in pythons:
            rc, seconds, tail = run_tests(base, pythons["ort-training"], training_tests)
            print(f"baseline ort-training ({len(training_tests)} test files): rc={rc} {tail} [{seconds:.0f} s]",
                  file=sys.stderr)
        if rc != 0:
            print("the unmutated copy fails; fix the suite first", file=sys.stderr)
            return 1
        shutil.rmtree(base)
        rows, caught = [], 0
        for i, m in enumerate(chosen):
            copy = Path(tmp) / f"m{i}"
            copy_repo(copy)
            target = copy / m.path
            text = target.read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"mutation {m.name}: the original text occurs {text.count(m.old)} times in {m.path}")
            target.write_text(text.replace(m.old, m.new))
            envs = ["onnxruntime"] + (["ort-training"] if m.training and "ort-training" in pythons else [])
            results = []
            for env_name in envs:
                rc, seconds, tail = run_tests(copy, pythons[env_name], m.tests)
                results.append((env_name, rc, seconds, tail))
            hit = any(rc not in (0, 5) for _, rc, _, _ in results)
            caught += hit
            detail = "; ".join(f"{e}: {t} ({s:.0f} s)" for e, _, s, t in results)
            rows.append(f"| {m.name} | {m.area} | {m.path} | {'caught' if hit else 'SURVIVED'} | {detail} |")
            print(rows[-1], file=sys.stderr, flush=True)
            shutil.rmtree(copy)
    print("| mutation | area | file | result | tests |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\n{caught}/{len(chosen)} caught ({100 * caught / len(chosen):.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
