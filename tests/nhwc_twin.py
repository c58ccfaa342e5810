"""Rewrite a channels-first CNN export into the channels-last form tf2onnx writes for a Keras model:
NHWC input, every tensor between the layers channels-last, a Transpose pair around each Conv / pooling
node, global pooling as ReduceMean over axes (1, 2). The weights are the same, so the twin computes the
same function on transposed inputs: what a TensorFlow port of a torch net should look like."""
from __future__ import annotations

import onnx
import numpy as np
from onnx import helper, numpy_helper

WRAPPED = {"Conv", "MaxPool", "AveragePool", "BatchNormalization"}          # need NCHW inside
ELEMENTWISE = {"Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Add", "Mul",
               "Identity"}
LAYOUT_FREE = {"Flatten", "Gemm", "MatMul", "Softmax"}                      # after the global pool


def nhwc_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    nodes = []
    source = graph.input[0]
    dims = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
    extra = []
    for node in graph.node:
        if node.op_type in WRAPPED:
            inner = node.name
            nodes.append(helper.make_node("Transpose", [node.input[0]], [node.input[0] + "__nchw_" + inner],
                                          name=inner + "__to_nchw", perm=[0, 3, 1, 2]))
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.input[0] = node.input[0] + "__nchw_" + inner
            clone.output[0] = node.output[0] + "__nchw"
            nodes.append(clone)
            nodes.append(helper.make_node("Transpose", [clone.output[0]], [node.output[0]],
                                          name=inner + "__to_nhwc", perm=[0, 2, 3, 1]))
        elif node.op_type == "GlobalAveragePool":
            opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            if opset >= 18:                                   # axes became an input in opset 18
                axes = numpy_helper.from_array(np.array([1, 2], np.int64), node.name + "__axes")
                extra.append(axes)
                nodes.append(helper.make_node("ReduceMean", [node.input[0], axes.name], [node.output[0]],
                                              name=node.name, keepdims=1))
            else:
                nodes.append(helper.make_node("ReduceMean", [node.input[0]], [node.output[0]],
                                              name=node.name, keepdims=1, axes=[1, 2]))
        elif node.op_type in ELEMENTWISE | LAYOUT_FREE:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            nodes.append(clone)
        else:
            raise ValueError(f"nhwc_twin does not know how to move {node.op_type} to channels-last")
    shape = [dims[0], dims[2], dims[3], dims[1]]
    new_input = helper.make_tensor_value_info(source.name, source.type.tensor_type.elem_type, shape)
    out = helper.make_graph(nodes, graph.name + "_nhwc", [new_input], list(graph.output),
                            list(graph.initializer) + extra)
    twin = helper.make_model(out, opset_imports=list(model.opset_import))
    twin.ir_version = model.ir_version
    onnx.checker.check_model(twin, full_check=True)
    return twin
