"""Shared helpers for the tests of the user's path (preprocessing, pictures, files, messages).

The references here are written from the definitions, in plain NumPy, without importing onnxcam, so a
test that compares onnxcam with them compares two independent computations.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ------------------------------------------------------------------ preprocessing, by hand


def bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (src = (dst + 0.5) * in / out - 0.5, clamped at the
    borders), in float64: the definition OpenCV's INTER_LINEAR implements (it rounds to uint8 after)."""
    src = image.astype(np.float64)
    h, w = src.shape[:2]

    def axis(out, size):
        pos = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    fy = fy[:, None, None] if src.ndim == 3 else fy[:, None]
    fx = fx[None, :, None] if src.ndim == 3 else fx[None, :]
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def reference_preprocess(rgb: np.ndarray, size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                         scale=1 / 255, color="RGB", layout="NCHW") -> np.ndarray:
    """x = (resize(image) * scale - mean) / std, channels in ``color`` order, in ``layout`` (no batch)."""
    image = rgb.astype(np.float64)
    if color == "BGR":
        image = image[..., [2, 1, 0]]
    if size is not None:
        image = bilinear_resize(image, size[0], size[1])
    x = (image * scale - np.array(mean, np.float64)) / np.array(std, np.float64)
    return x.transpose(2, 0, 1) if layout == "NCHW" else x


def channel_mean_model(height: int, width: int, layout: str = "NCHW", metadata: dict | None = None):
    """A 'classifier' whose logit k is the spatial mean of input channel k: the scores the CLI prints
    are then the channel means of the preprocessed input, so they show what preprocessing fed the model.
    The explained node 'act' is the input times one (channels-first)."""
    shape = ["N", 3, height, width] if layout == "NCHW" else ["N", height, width, 3]
    nodes = []
    first = "input"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], name="/to_nchw", perm=[0, 3, 1, 2]))
        first = "nchw"
    nodes += [
        helper.make_node("Mul", [first, "one"], ["act"], name="/features/act/Mul"),
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="/pool"),
        helper.make_node("Flatten", ["pooled"], ["logits"], name="/flatten", axis=1),
    ]
    graph = helper.make_graph(nodes, "channel_mean",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, {"onnxcam.preprocess": json.dumps(metadata)})
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------ pictures, by hand

# OpenCV's JET colormap at 0 and 1 (RGB): dark blue and dark red.
JET_LOW_RGB = (0, 0, 128)
JET_HIGH_RGB = (128, 0, 0)


def reference_jet(cam: np.ndarray) -> np.ndarray:
    """The JET colouring as pytorch-grad-cam's show_cam_on_image does it: cv2.applyColorMap of
    uint8(255 * map), BGR turned to RGB (the channel flip written out by index)."""
    import cv2
    bgr = cv2.applyColorMap(np.uint8(255 * np.clip(cam, 0, 1)), cv2.COLORMAP_JET)
    return bgr[..., [2, 1, 0]]


def reference_overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * photo + alpha * JET(map resized to the photo), rounded."""
    h, w = rgb.shape[:2]
    if cam.shape != (h, w):
        cam = bilinear_resize(cam.astype(np.float64), h, w)
    heat = reference_jet(cam).astype(np.float64)
    return np.clip(np.rint((1 - alpha) * rgb.astype(np.float64) + alpha * heat), 0, 255).astype(np.uint8)


def is_hot(pixel) -> bool:
    r, g, b = (int(v) for v in pixel[:3])
    return r > b + 60 and r > g + 60


def is_cold(pixel) -> bool:
    r, g, b = (int(v) for v in pixel[:3])
    return b > r + 60 and b > g + 60


# ------------------------------------------------------------------ the command line


def run_cli(*args):
    """Invoke ``onnxcam`` in-process; stdout and stderr kept apart (click >= 8.2 always separates them;
    older releases need mix_stderr=False)."""
    from click.testing import CliRunner

    from onnxcam.cli import main
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args])


def assert_error(result, message: str) -> None:
    """Exit code 1, nothing on stdout, and stderr exactly ``error: <message>`` on one line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == "", result.stdout
    assert result.stderr == f"error: {message}\n", result.stderr


# ------------------------------------------------------------------ file permissions, also as root


def run_without_privileges(code: str, *args: str, timeout: float = 120):
    """Run ``python -c code args`` where file permissions apply: as is for a normal user; as root
    (how CI runs) under ``setpriv`` with every capability dropped, so root's CAP_DAC_OVERRIDE no longer
    lets it write into a read-only folder. Returns the CompletedProcess; skips where neither works."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parent.parent
    prefix = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop CAP_DAC_OVERRIDE")
        prefix = [setpriv, "--bounding-set=-all", "--inh-caps=-all"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(prefix + [sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
