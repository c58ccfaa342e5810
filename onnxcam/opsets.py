"""Op signatures that changed across ONNX opsets, in one place for every graph builder in onnxcam."""
from __future__ import annotations

_AXES_INPUT_SINCE_13 = ("ReduceSum", "Squeeze", "Unsqueeze")   # the other Reduce* ops: since opset 18


def axes_are_input(op_type: str, opset: int) -> bool:
    """True where ``op_type`` takes its axes as an int64 input rather than an attribute."""
    return opset >= (13 if op_type in _AXES_INPUT_SINCE_13 else 18)
