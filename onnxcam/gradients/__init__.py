"""Gradient backends: add d(score)/d(activation) outputs to a model.

Contract shared by every backend: given a model (external data loaded) whose graph computes a scalar
float tensor ``score`` and the names of intermediate float tensors ``wrt``, return a new model whose
outputs are the original outputs followed by one output per ``wrt`` tensor, named
``gradient_name(t)``, holding d score / d t with the shape of ``t``.
"""
from __future__ import annotations

import onnx

from ..errors import OnnxcamError

BACKENDS = ("auto", "portable", "ort-training")
GRADIENT_PREFIX = "onnxcam_grad__"


def gradient_name(tensor: str) -> str:
    """Name of the graph output holding d score / d ``tensor``."""
    return GRADIENT_PREFIX + tensor


def ort_training_available() -> bool:
    """True when the installed onnxruntime is a training build (it has GradientGraphBuilder)."""
    try:
        from onnxruntime.capi._pybind_state import GradientGraphBuilder  # noqa: F401
    except Exception:
        return False
    return True


def build_gradient_model(model: onnx.ModelProto, score: str, wrt: list[str],
                         backend: str = "auto") -> tuple[onnx.ModelProto, str]:
    """Return (augmented model, name of the backend used)."""
    if backend not in BACKENDS:
        raise OnnxcamError(f"unknown gradient backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from . import portable
    if backend == "portable":
        return portable.build(model, score, wrt), "portable"
    if backend == "ort-training":
        if not ort_training_available():
            raise OnnxcamError("--grad-backend ort-training needs a training build of ONNX Runtime; "
                               "install onnxcam[training-cpu] (or [training]) in its own environment, "
                               "or use --grad-backend portable")
        return _ort_training(model, score, wrt), "ort-training"
    missing = portable.unsupported_ops(model, score, wrt)
    if not missing:
        return portable.build(model, score, wrt), "portable"
    if ort_training_available():
        return _ort_training(model, score, wrt, missing), "ort-training"
    raise OnnxcamError("no portable gradient rule for " + ", ".join(missing)
                       + "; install onnxcam[training-cpu] for the ort-training backend, or pick a node "
                       "closer to the output")


def _ort_training(model: onnx.ModelProto, score: str, wrt: list[str], missing: list[str] | None = None):
    """ort-training's gradient model; where it fails and the portable backend fails too (``missing``,
    found here when not given), one message for both instead of advice to use the other."""
    from . import ort_training, portable
    try:
        return ort_training.build(model, score, wrt)
    except ort_training.BuilderFailure as failure:
        missing = portable.unsupported_ops(model, score, wrt) if missing is None else missing
        if missing:
            raise OnnxcamError(neither_backend_message(missing, failure.reason)) from None
        raise


def neither_backend_message(portable_problems: list[str], training_reason: str) -> str:
    """One message for ``auto`` when both backends failed: the op(s), each backend's reason, and the one
    way forward that is left (a node after the op nearest the score; portable lists from the score back)."""
    labels = [p[:p.index("): ") + 1] if "): " in p else p for p in portable_problems]
    reasons = [p[len(label) + 2:] if len(portable_problems) == 1 else p
               for p, label in zip(portable_problems, labels)]
    return (f"neither gradient backend can differentiate {', '.join(labels)} on the path from the chosen node "
            f"to the score (portable backend: {'; '.join(reasons)}; {training_reason}); pick a node after "
            f"{'it' if len(labels) == 1 else labels[0]}, closer to the output")
