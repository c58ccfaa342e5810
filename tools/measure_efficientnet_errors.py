"""Measure how far onnxcam's EfficientNet-Lite0 maps and gradients lie from the torch oracle, per
photo, so that tests/test_efficientnet.py's tolerances are set from measurements (about 10x).

    PYTHONPATH=. python tools/measure_efficientnet_errors.py

Prints one line per quantity: the export, what was compared and the error for each of the four
photos (chelsea, coffee, rocket, astronaut). Never a test: a script that reports numbers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools")]

import make_efficientnet  # noqa: E402
import torch_oracle  # noqa: E402
from onnxcam import METHODS, Explainer  # noqa: E402

EGYPTIAN_CAT = 285
TARGETS = [EGYPTIAN_CAT, 504, 1, 999]


def per_photo_max(a, b):
    return [float(np.abs(a[i] - b[i]).max()) for i in range(len(a))]


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    images = make_efficientnet.example_photos()
    photos = np.concatenate([make_efficientnet.preprocess_image(images[n])
                             for n in ("chelsea", "coffee", "rocket", "astronaut")])
    torch_model = make_efficientnet.build_efficientnet_torch()
    fc = torch_model._fc.weight.detach().numpy()
    for dynamo in (False, True):
        kind = "dynamo" if dynamo else "legacy"
        name = "efficientnet_lite0_dynamo.onnx" if dynamo else "efficientnet_lite0.onnx"
        path = make_efficientnet.build(ROOT / ".cache" / "models" / name, dynamo=dynamo)
        explainer = Explainer(str(path), "auto", cache=False)
        for method in [m for m in METHODS if m not in ("scorecam", "legrad")]:
            result = explainer.explain(photos, method=method, targets=TARGETS)
            ref = torch_oracle.reference_maps(method, torch_model, torch_model._swish, photos, result.targets,
                                              -1, fc_weight=fc)
            print(kind, "map", method, ["%.2e" % e for e in per_photo_max(result.maps, ref)], flush=True)
        if not dynamo:
            sc = Explainer(str(path), "_blocks.15", cache=False)
            result = sc.explain(photos[:1], method="scorecam", targets=[EGYPTIAN_CAT], batch_size=64)
            ref = torch_oracle.reference_maps("scorecam", torch_model, torch_model._blocks[15], photos[:1],
                                              [EGYPTIAN_CAT])
            print(kind, "map scorecam", ["%.2e" % e for e in per_photo_max(result.maps, ref)], flush=True)
        for scope in ("_blocks.15", "_blocks.1"):
            grad = Explainer(str(path), scope, grad_backend="portable", cache=False)
            _, runner = grad.gradient_session()
            weights = np.zeros((4, 1000), np.float32)
            weights[np.arange(4), TARGETS] = 1
            _, A, G = runner.run({"input": photos, "onnxcam_target_weights": weights})
            A_ref, G_ref, _ = torch_oracle.activations_and_gradients(
                torch_model, torch_model.get_submodule(scope), photos, TARGETS)
            print(kind, "activation rel", scope, "%.2e" % relative(A, A_ref))
            print(kind, "gradient rel", scope, ["%.2e" % relative(G[i], G_ref[i]) for i in range(4)], flush=True)


if __name__ == "__main__":
    main()
