"""Tiny hand-built ONNX classifiers whose CAMs can be computed with a pencil (and NumPy)."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def tiny_classifier(channels=4, classes=3, size=8, softmax=True, seed=0, batch="N",
                    metadata=True, rank=2) -> onnx.ModelProto:
    """input (N,3,size[,size[,size]]) -> Conv 3 -> Relu [the node] -> GlobalAveragePool -> Flatten ->
    Gemm (-> Softmax), with ``rank`` spatial axes. Weights seeded; the Relu output is named 'act'."""
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.5, (channels, 3) + (3,) * rank).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (channels,)).astype(np.float32)
    fc_w = rng.normal(0, 1.0, (classes, channels)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, (classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], name="/features/conv/Conv",
                         pads=[1] * 2 * rank, kernel_shape=[3] * rank),
        helper.make_node("Relu", ["conv"], ["act"], name="/features/relu/Relu"),
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="/Flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    output = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="/Softmax", axis=1))
        output = "probs"
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3] + [size] * rank)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(a, n) for a, n in
         ((conv_w, "conv_w"), (conv_b, "conv_b"), (fc_w, "fc_w"), (fc_b, "fc_b"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    if metadata and rank == 2:
        helper.set_model_props(model, {
            "onnxcam.preprocess": json.dumps({"size": [size, size], "mean": [0.5, 0.5, 0.5],
                                              "std": [0.25, 0.25, 0.25], "scale": 1 / 255,
                                              "color": "RGB", "layout": "NCHW"}),
            "onnxcam.class_names": json.dumps([f"class{i}" for i in range(classes)])})
    onnx.checker.check_model(model, full_check=True)
    return model


def fc_weights(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc_w"))


def reference_gradcam_layer_map(activations: np.ndarray, fc_w: np.ndarray, targets) -> np.ndarray:
    """Grad-CAM by hand for GAP -> linear: d z_c / d A[k, i, j] = W[c, k] / (H * W) exactly."""
    n, _, h, w = activations.shape
    weights = fc_w[np.asarray(targets)] / (h * w)                    # (N, C)
    return np.maximum(np.einsum("nc,nchw->nhw", weights, activations), 0)


def tiny_segmenter(channels=4, classes=3, size=8, seed=0) -> onnx.ModelProto:
    """input (N,3,size,size) -> Conv 3x3 -> Relu ['act'] -> Conv 1x1 -> per-pixel logits (N,K,size,size).
    d (sum of class c over mask M) / d A[k,i,j] = W[c,k] * M[i,j] exactly."""
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32)
    head_w = rng.normal(0, 1.0, (classes, channels, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], name="/enc/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["act"], name="/enc/Relu"),
        helper.make_node("Conv", ["act", "head_w"], ["logits"], name="/head/Conv"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_seg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, size, size])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(head_w, "head_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def small_resnet(seed=0, nhwc=False) -> onnx.ModelProto:
    """A residual CNN with the ops real exports use: Conv+BatchNormalization+Relu, MaxPool, a depthwise
    Conv with Clip (ReLU6), a residual Add, GlobalAveragePool, Flatten, Gemm, Softmax.
    With ``nhwc`` the input is channels-last and Transposes wrap the network, tf2onnx style.
    Intermediate tensors worth explaining: 'stem' (early), 'res' (late)."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return rng.normal(0, scale, shape).astype(np.float32)

    inits = {
        "c1_w": w(8, 3, 3, 3), "bn_s": (1 + 0.1 * rng.normal(size=8)).astype(np.float32),
        "bn_b": w(8, scale=0.1), "bn_m": w(8, scale=0.1), "bn_v": (1 + rng.random(8)).astype(np.float32),
        "dw_w": w(8, 1, 3, 3), "c2_w": w(8, 8, 1, 1), "c2_b": w(8, scale=0.1),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
        "fc_w": w(5, 8, scale=1.0), "fc_b": w(5, scale=0.1),
    }
    first = "input"
    nodes = []
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["input"], ["input_nchw"], name="model/to_nchw",
                                      perm=[0, 3, 1, 2]))
        first = "input_nchw"
    nodes += [
        helper.make_node("Conv", [first, "c1_w"], ["c1"], name="model/stem/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"],
                         name="model/stem/BatchNorm", epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["stem"], name="model/stem/Relu"),
        helper.make_node("MaxPool", ["stem"], ["pool"], name="model/pool/MaxPool", kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["pool", "dw_w"], ["dw"], name="model/block/dw/Conv", group=8,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["dw", "lo", "hi"], ["dw6"], name="model/block/relu6/Clip"),
        helper.make_node("Conv", ["dw6", "c2_w", "c2_b"], ["c2"], name="model/block/pw/Conv"),
        helper.make_node("Add", ["c2", "pool"], ["res"], name="model/block/Add"),
        helper.make_node("GlobalAveragePool", ["res"], ["gap"], name="model/gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="model/flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="model/fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="model/softmax", axis=1),
    ]
    shape = ["N", 16, 16, 3] if nhwc else ["N", 3, 16, 16]
    graph = helper.make_graph(nodes, "small_resnet",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def keras_mobilenet_like(nhwc: bool = True, seed: int = 0, size: int = 32) -> onnx.ModelProto:
    """A MobileNet-style classifier as tf2onnx writes a Keras 3 model: NHWC input, a Transpose pair around
    every convolution, ReLU6 as Clip on NHWC tensors, ReduceMean over axes (1, 2), MatMul + Add, Softmax,
    and Keras-3 scope names (`functional_1/mobilenetv2_1.00_160_1/out_relu_1/Relu6`).
    With ``nhwc=False``: the NCHW twin with the same weights (Conv, Clip, GlobalAveragePool, Flatten,
    MatMul, Add, Softmax)."""
    rng = np.random.default_rng(seed)
    c1, c2, k = 8, 16, 6
    weights = {
        "Conv1/kernel": rng.normal(0, 0.4, (c1, 3, 3, 3)).astype(np.float32),
        "Conv1/bias": rng.normal(0, 0.1, (c1,)).astype(np.float32),
        "dw/kernel": rng.normal(0, 0.4, (c1, 1, 3, 3)).astype(np.float32),
        "dw/bias": rng.normal(0, 0.1, (c1,)).astype(np.float32),
        "Conv_1/kernel": rng.normal(0, 0.4, (c2, c1, 1, 1)).astype(np.float32),
        "Conv_1/bias": rng.normal(0.5, 0.3, (c2,)).astype(np.float32),
        "predictions/kernel": rng.normal(0, 1.0, (c2, k)).astype(np.float32),
        "predictions/bias": rng.normal(0, 0.1, (k,)).astype(np.float32),
        "relu6/min": np.array(0.0, np.float32), "relu6/max": np.array(6.0, np.float32),
    }
    scope = "functional_1/mobilenetv2_1.00_160_1/"
    nodes = []

    def conv(name, x, out, stride, group, pad):
        args = dict(strides=[stride, stride], pads=[pad] * 4, group=group)
        if not nhwc:
            nodes.append(helper.make_node("Conv", [x, f"{name}/kernel", f"{name}/bias"], [out],
                                          name=f"{scope}{name}_1/convolution", **args))
            return
        nodes.extend([
            helper.make_node("Transpose", [x], [out + "__nchw"], name=f"{scope}{name}_1/convolution__1",
                             perm=[0, 3, 1, 2]),
            helper.make_node("Conv", [out + "__nchw", f"{name}/kernel", f"{name}/bias"], [out + "__conv"],
                             name=f"{scope}{name}_1/convolution", **args),
            helper.make_node("Transpose", [out + "__conv"], [out], name=f"{scope}{name}_1/convolution__2",
                             perm=[0, 2, 3, 1]),
        ])

    def relu6(name, x, out):
        nodes.append(helper.make_node("Clip", [x, "relu6/min", "relu6/max"], [out],
                                      name=f"{scope}{name}_1/Relu6"))

    conv("Conv1", "input", "conv1", 2, 1, 1)
    relu6("Conv1_relu", "conv1", "conv1_relu")
    conv("dw", "conv1_relu", "dw", 1, c1, 1)
    relu6("dw_relu", "dw", "dw_relu")
    conv("Conv_1", "dw_relu", "conv_1", 2, 1, 0)
    relu6("out_relu", "conv_1", "out_relu")
    if nhwc:
        axes = numpy_helper.from_array(np.array([1, 2], np.int64), "pool/axes")
        nodes.append(helper.make_node("ReduceMean", ["out_relu", "pool/axes"], ["pooled"], keepdims=0,
                                      name="functional_1/global_average_pooling2d_1/Mean"))
        extra = [axes]
    else:
        nodes.extend([helper.make_node("GlobalAveragePool", ["out_relu"], ["gap"], name="gap"),
                      helper.make_node("Flatten", ["gap"], ["pooled"], name="flatten")])
        extra = []
    nodes.extend([
        helper.make_node("MatMul", ["pooled", "predictions/kernel"], ["matmul"],
                         name="functional_1/predictions_1/MatMul"),
        helper.make_node("Add", ["matmul", "predictions/bias"], ["logits"], name="functional_1/predictions_1/Add"),
        helper.make_node("Softmax", ["logits"], ["predictions"], name="functional_1/predictions_1/Softmax",
                         axis=-1),
    ])
    shape = ["unk__1", size, size, 3] if nhwc else ["unk__1", 3, size, size]
    graph = helper.make_graph(nodes, "keras_like",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__1", k])],
                              [numpy_helper.from_array(v, n) for n, v in weights.items()] + extra)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def with_unruled_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with an Einsum (no portable rule) between the Relu and the pooling: 'act' -> 'act2'."""
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    for node in clone.graph.node:
        if node.op_type == "GlobalAveragePool":
            node.input[0] = "act2"
    index = [n.name for n in clone.graph.node].index("/features/relu/Relu") + 1
    clone.graph.node.insert(index, helper.make_node("Einsum", ["act"], ["act2"], name="/features/einsum",
                                                    equation="nchw->nchw"))
    onnx.checker.check_model(clone, full_check=True)
    return clone


def flattened_node_classifier() -> onnx.ModelProto:
    """A 2D classifier whose conv output is reshaped to (N, 4, 64) before pooling: that node has one
    spatial axis while the input has two."""
    model = tiny_classifier(softmax=False, metadata=False)
    for node in model.graph.node:
        if node.op_type == "GlobalAveragePool":
            node.op_type, node.input[0] = "ReduceMean", "flat_act"
            node.attribute.extend([helper.make_attribute("axes", [2])])
        if node.op_type == "Flatten":
            node.input[0] = "pooled"
    index = [n.name for n in model.graph.node].index("/features/relu/Relu") + 1
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 4, 64], np.int64), "flat_shape"))
    model.graph.node.insert(index, helper.make_node("Reshape", ["act", "flat_shape"], ["flat_act"],
                                                    name="/features/reshape"))
    opset = model.opset_import[0]
    opset.version = 17
    onnx.checker.check_model(model, full_check=True)
    return model


def channels_last_1d(length: int = 24, channels: int = 2, filters: int = 6, classes: int = 4,
                     seed: int = 0) -> onnx.ModelProto:
    """A Keras-style 1D net on (N, L, C) signals: Transpose -> Conv -> Relu -> Transpose back, so the
    explained node 'features' is channels-last (N, L', F); then a mean over time and a MatMul."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(scale=0.5, size=(filters, channels, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(filters, classes)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Transpose", ["signal"], ["ncl"], perm=[0, 2, 1], name="to_ncl"),
        helper.make_node("Conv", ["ncl", "w"], ["conv"], pads=[1, 1], name="conv1d/Conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="conv1d/Relu"),
        helper.make_node("Transpose", ["relu"], ["features"], perm=[0, 2, 1], name="features"),
        helper.make_node("ReduceMean", ["features"], ["pooled"], axes=[1], keepdims=0, name="pool"),
        helper.make_node("MatMul", ["pooled", "fc"], ["logits"], name="dense"),
    ]
    graph = helper.make_graph(nodes, "nlc", [helper.make_tensor_value_info("signal", TensorProto.FLOAT,
                                                                           ["N", length, channels])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8          # onnxruntime-training 1.19 reads IR versions up to 10
    return model
