"""Shapes that ONNX shape inference cannot find, measured instead, so the gradient builder can work.

The portable gradient rules need each tensor's rank (and some static sizes). Exports of
``nn.MultiheadAttention`` (torchvision's ViT) compute a Reshape target from Shape/Slice/Mod arithmetic
that inference does not follow, leaving every tensor after it without a rank. One run on zeros at batch
1 and one at batch 2 measure them: a dim that stays put is static, a dim that moves with the batch is
written symbolic, so nothing batch-sized is baked into the gradient graph.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .graph import GraphView, copy_model
from .runtime import probe_shapes


def with_measured_shapes(proto: onnx.ModelProto, probe: dict[str, tuple] | None) -> onnx.ModelProto:
    """``proto`` itself when every node output has a known rank (or no probe shape is known), else a
    copy whose value_info gives the measured shapes of the others."""
    if not probe:
        return proto
    view = GraphView(proto)
    types = view.types()
    unknown = [out for node in view.graph.node for out in node.output
               if out and node.op_type != "Constant" and (out not in types or types[out][1] is None)]
    if not unknown:
        return proto
    once = probe_shapes(proto, unknown, probe)
    twice = probe_shapes(proto, unknown, {name: (2, *shape[1:]) for name, shape in probe.items()})
    filled = copy_model(proto)
    for index, name in enumerate(unknown):
        (elem_type, first), (_, second) = once[name], twice[name]
        if elem_type is None or len(first) != len(second):
            continue
        dims = [a if a == b else f"onnxcam_m{index}_{axis}" for axis, (a, b) in enumerate(zip(first, second))]
        filled.graph.value_info.append(helper.make_tensor_value_info(name, elem_type, dims))
    return filled
