"""Op signatures that changed across ONNX opsets, in one place for every graph builder in onnxcam."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

_AXES_INPUT_SINCE_13 = ("ReduceSum", "Squeeze", "Unsqueeze")   # the other Reduce* ops: since opset 18


def axes_are_input(op_type: str, opset: int) -> bool:
    """True where ``op_type`` takes its axes as an int64 input rather than an attribute."""
    return opset >= (13 if op_type in _AXES_INPUT_SINCE_13 else 18)


def axes_node(op_type: str, data: str, out: str, axes, opset: int, make_axes: Callable[[np.ndarray], str],
              **attrs) -> onnx.NodeProto:
    """``op_type(data)`` over ``axes``, written the way ``opset`` wants; ``make_axes`` turns the axes
    into a constant tensor's name when they go in as an input."""
    axes = [int(a) for a in axes]
    if axes_are_input(op_type, opset):
        return helper.make_node(op_type, [data, make_axes(np.array(axes, dtype=np.int64))], [out], **attrs)
    return helper.make_node(op_type, [data], [out], axes=axes, **attrs)
