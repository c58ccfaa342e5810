"""A/B timing of two versions of onnxcam's in-graph maps model, apart from the machine's noise.

The bench (tools/bench.py) compares onnxcam with a plain forward pass; on a loaded machine its ratios
move by ±0.1 between runs, more than one graph change gains. This tool times the two models themselves,
in one process, on the same feeds, in turns (forward, A, B, forward, A, B, ...), and prints each one's
best and median and the paired median of B / A; it also checks that both give the same outputs.

    # onnxcam is imported from the current folder: run ``save`` from the root of each version's checkout
    git worktree add /tmp/old OLD_COMMIT
    (cd /tmp/old && python "$OLDPWD/tools/bench_ab.py" save --methods gradcam --out /tmp/ab/old)
    python tools/bench_ab.py save --methods gradcam --out /tmp/ab/new
    python tools/bench_ab.py compare /tmp/ab/new.forward.onnx /tmp/ab/old.onnx /tmp/ab/new.onnx --batch 1

``save`` writes NAME.onnx (the gradient model with the final maps of ``--methods`` appended, as
``Explainer.explain_many`` runs it) and NAME.forward.onnx (the plain model). ``eigencam`` times
EigenCAM's per-image SVDs of a (batch, channels, 7, 7) array on one thread against ``--threads``.
Default model: EfficientNet-Lite0 at ``_blocks.15`` (tools/make_efficientnet.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.getcwd())     # the onnxcam of the checkout this runs in (see above)


def save(args) -> None:
    from onnxcam import Explainer
    from onnxcam.graph import copy_model
    from onnxcam.maps_graph import append_maps
    from onnxcam.methods import get_method
    from onnxcam.surgery import build_forward_model

    methods = args.methods.split(",")
    explainer = Explainer(args.model, args.node, provider="cpu", cache=False)
    x = np.zeros((1, *explainer.probe_shape[1:]), np.float32)
    for method in methods:
        explainer.check_method(method)
    specs = [get_method(m) for m in methods]
    plan = explainer._graph_maps.plan(specs, x)
    if plan is None:
        raise SystemExit(f"{args.model}: the methods {methods} have no in-graph maps here")
    names, node_layouts, with_activations = plan
    layer_sizes, input_size = explainer._graph_maps.static_sizes(node_layouts)
    gradient = explainer.augmented_gradient_model()
    proto = copy_model(gradient.proto)
    append_maps(proto, gradient.input_name, explainer.input_layout, gradient.logits, gradient.activations,
                gradient.gradients, node_layouts, names, expose_activations=with_activations,
                layer_sizes=layer_sizes, input_size=input_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".onnx").write_bytes(proto.SerializeToString())
    forward = build_forward_model(explainer.model, [], False, None).proto
    out.with_suffix(".forward.onnx").write_bytes(forward.SerializeToString())
    print(f"wrote {out.with_suffix('.onnx')} ({', '.join(names)}) and {out.with_suffix('.forward.onnx')}")


def compare(args) -> None:
    import onnxruntime as ort
    from onnxcam.runtime import session_options

    def session(path):
        return ort.InferenceSession(Path(path).read_bytes(), sess_options=session_options(args.threads),
                                    providers=["CPUExecutionProvider"])

    forward, a, b = session(args.forward), session(args.a), session(args.b)
    name = forward.get_inputs()[0].name
    shape = [args.batch, *forward.get_inputs()[0].shape[1:]]
    if not all(isinstance(d, int) for d in shape):
        raise SystemExit(f"the model input {forward.get_inputs()[0].shape} is not static past the batch")
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    classes = a.get_outputs()[0].shape[-1]
    feeds = {name: x, "onnxcam_target_weights": np.zeros((args.batch, classes), np.float32)}
    outputs_a, outputs_b = a.run(None, feeds), b.run(None, feeds)
    if len(outputs_a) != len(outputs_b):
        raise SystemExit("the two models have different outputs; save both with the same --methods")
    difference = max(float(np.abs(p - q).max()) for p, q in zip(outputs_a, outputs_b))
    times = {"forward": [], "A": [], "B": []}
    calls = 10 if args.batch == 1 else 1
    for _ in range(args.rounds):
        for key, s, f in (("forward", forward, {name: x}), ("A", a, feeds), ("B", b, feeds)):
            s.run(None, f)                        # untimed: each timed call follows one of its own
            start = time.perf_counter()
            for _ in range(calls):
                s.run(None, f)
            times[key].append((time.perf_counter() - start) / calls)
    t = {k: np.array(v) for k, v in times.items()}
    print(f"batch {args.batch}, {args.threads} threads, {args.rounds} rounds; largest output difference "
          f"A vs B {difference:.3g}")
    for key, v in t.items():
        print(f"  {key:8s} best {v.min() * 1e3:8.3f} ms   median {np.median(v) * 1e3:8.3f} ms")
    print(f"  A / forward {np.median(t['A'] / t['forward']):.3f}, B / forward {np.median(t['B'] / t['forward']):.3f}, "
          f"B / A {np.median(t['B'] / t['A']):.3f} (paired medians)")


def eigencam_threads(args) -> None:
    from onnxcam.methods import eigencam

    A = np.random.default_rng(0).standard_normal((args.batch, args.channels, 7, 7)).astype(np.float32)
    serial, spread = eigencam(A, threads=1), eigencam(A, threads=args.threads)
    if not np.array_equal(serial, spread):
        raise SystemExit("the threaded EigenCAM maps differ from the serial ones")
    best = {}
    for threads in (1, args.threads):
        runs = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            eigencam(A, threads=threads)
            runs.append(time.perf_counter() - start)
        best[threads] = min(runs)
        print(f"  threads={threads}: best {min(runs) * 1e3:.1f} ms, median {np.median(runs) * 1e3:.1f} ms")
    print(f"EigenCAM ({args.batch} x {args.channels} x 7 x 7): {best[1] * 1e3:.1f} -> "
          f"{best[args.threads] * 1e3:.1f} ms with {args.threads} threads; maps bit-identical")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("save", help="write this checkout's maps model and the plain model")
    p.add_argument("--model", default=str(ROOT / "models" / "efficientnet_lite0.onnx"))
    p.add_argument("--node", default="_blocks.15")
    p.add_argument("--methods", default="gradcam", help="comma-separated in-graph methods")
    p.add_argument("--out", required=True, help="path without suffix: writes OUT.onnx and OUT.forward.onnx")
    p.set_defaults(run=save)
    p = commands.add_parser("compare", help="time the plain model, A and B in turns")
    p.add_argument("forward")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=60)
    p.set_defaults(run=compare)
    p = commands.add_parser("eigencam", help="EigenCAM's SVDs on one thread against --threads")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.set_defaults(run=eigencam_threads)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
