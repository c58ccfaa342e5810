"""Candidate listing, default node and --node resolution on real torch exports and hand-built graphs."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import nodes
from onnxcam.errors import OnnxcamError
from onnxcam.nodes import default_node, format_table, has_spatial_axes, list_candidates, resolve_node


# ---------------------------------------------------------------- torch exports


def _tiny_resnet():
    """torchvision naming (`layer4` of BasicBlocks whose one `relu` module is called twice) plus an
    EfficientNet-style `_blocks` ModuleList. torch is needed only here: the hand-built tests run without it."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(channels)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.conv2(y) + x)

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.relu = nn.ReLU()
            self._blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)])
            self.layer4 = nn.Sequential(BasicBlock(8), BasicBlock(8))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.relu(self.conv1(x))
            for block in self._blocks:
                x = torch.relu(block(x))
            x = self.layer4(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return torch, TinyResNet().eval()


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    torch, net = _tiny_resnet()
    path = tmp_path_factory.mktemp("legacy") / "resnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 16, 16), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    return model, list_candidates(model)


@pytest.fixture(scope="module")
def dynamo(tmp_path_factory):
    torch, net = _tiny_resnet()
    path = tmp_path_factory.mktemp("dynamo") / "resnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=True,
                          verbose=False)
    model = onnx.load(str(path))
    return model, list_candidates(model)


def test_legacy_candidates_shapes_and_scopes(legacy):
    model, candidates = legacy
    by_name = {c.name: c for c in candidates}
    last = by_name["/layer4/layer4.1/relu_1/Relu"]
    assert last.shape == (None, 8, 8, 8)  # symbolic batch stays None, no probe needed
    assert last.scope == "layer4/layer4.1/relu_1"
    assert last.tensor == "/layer4/layer4.1/relu_1/Relu_output_0"
    assert last.spatial and last.op_type == "Relu"
    assert model.graph.node[last.index].name == last.name
    pooled = by_name["/avgpool/GlobalAveragePool"]
    assert pooled.shape == (None, 8, 1, 1) and not pooled.spatial
    assert "/fc/Gemm" not in by_name  # rank 2 is no candidate
    assert [c.index for c in candidates] == sorted(c.index for c in candidates)


def test_dynamo_scopes_come_from_name_scopes_metadata(dynamo):
    model, candidates = dynamo
    metadata = {p.key: p.value for p in model.graph.node[candidates[-2].index].metadata_props}
    # torch 2.13 writes the repr of a Python list: root '', qualified module names, the FX node name
    assert metadata[nodes.DYNAMO_SCOPES_KEY].startswith("['', 'layer4', 'layer4.1', 'layer4.1.relu'")
    assert candidates[-2].scope == "layer4/layer4.1/layer4.1.relu"
    assert candidates[-2].shape == (1, 8, 8, 8)


@pytest.mark.parametrize("spec, expected", [
    ("/layer4/Relu", "/layer4/layer4.1/relu_1/Relu"),
    ("layer4/Relu", "/layer4/layer4.1/relu_1/Relu"),
    ("layer4", "/layer4/layer4.1/relu_1/Relu"),
    ("/layer4", "/layer4/layer4.1/relu_1/Relu"),
    ("layer4.1", "/layer4/layer4.1/relu_1/Relu"),
    ("layer4.0", "/layer4/layer4.0/relu_1/Relu"),
    ("layer4/layer4.0/conv2", "/layer4/layer4.0/conv2/Conv"),
    ("layer4.0.conv1", "/layer4/layer4.0/conv1/Conv"),
    ("layer4.0.conv2", "/layer4/layer4.0/conv2/Conv"),
    ("layer4/0/conv2", "/layer4/layer4.0/conv2/Conv"),
    ("layer4.1/Add", "/layer4/layer4.1/Add"),
    ("_blocks.1", "/_blocks.1/Conv"),
    ("conv1", "/conv1/Conv"),  # the root's conv1, not the blocks'
    ("Relu", "/layer4/layer4.1/relu_1/Relu"),
    ("/layer4/layer4.0/relu/Relu", "/layer4/layer4.0/relu/Relu"),  # exact node name
    ("/layer4/layer4.0/Add_output_0", "/layer4/layer4.0/Add"),  # output tensor
    ("auto", "/layer4/layer4.1/relu_1/Relu"),
])
def test_resolve_on_legacy_export(legacy, spec, expected):
    model, candidates = legacy
    assert resolve_node(model, spec, candidates).name == expected


@pytest.mark.parametrize("spec, expected", [
    ("/layer4/Relu", "node_relu_6"),
    ("layer4", "node_relu_6"),
    ("/layer4", "node_relu_6"),
    ("layer4.1", "node_relu_6"),
    ("layer4.0", "node_relu_4"),
    ("layer4.0.conv2", "node_conv2d_4"),
    ("layer4/layer4.0/conv2", "node_conv2d_4"),  # legacy-style path on a dynamo export
    ("layer4/0/conv2", "node_conv2d_4"),
    ("_blocks.1", "node_conv2d_2"),
    ("relu_6", "node_relu_6"),  # output tensor
    ("node_add", "node_add"),  # node name
    ("auto", "node_relu_6"),
])
def test_resolve_on_dynamo_export(dynamo, spec, expected):
    model, candidates = dynamo
    assert resolve_node(model, spec, candidates).name == expected


def test_dynamo_folded_conv_is_found_by_its_weight_name(dynamo):
    model, candidates = dynamo
    chosen = resolve_node(model, "layer4.0.conv1", candidates)
    node = model.graph.node[chosen.index]
    assert node.op_type == "Conv" and "layer4.0.conv1.weight" in node.input
    assert chosen.scope == "layer4/layer4.0/layer4.0.bn1"  # the exporter scoped the fused node under bn1


def test_default_is_the_layer_entering_global_pool(legacy, dynamo):
    for model, candidates in (legacy, dynamo):
        chosen = default_node(candidates, model)
        pool_inputs = [n.input[0] for n in model.graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
        assert chosen.tensor == pool_inputs[-1]


def test_non_spatial_node_is_refused_in_one_line(legacy):
    model, candidates = legacy
    with pytest.raises(OnnxcamError) as error:
        resolve_node(model, "/fc/Gemm", candidates)
    assert str(error.value) == ("node /fc/Gemm outputs shape (?, 5), which has no spatial axes; pick a "
                                "convolutional layer (see `onnxcam nodes MODEL`)")
    with pytest.raises(OnnxcamError, match=r"node /avgpool/GlobalAveragePool outputs shape \(\?, 8, 1, 1\)"):
        resolve_node(model, "avgpool", candidates)


def test_unknown_spec_lists_closest_matches_in_one_line(legacy):
    model, candidates = legacy
    with pytest.raises(OnnxcamError) as error:
        resolve_node(model, "layer5", candidates)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("no node, output tensor or module scope matches 'layer5'; closest: layer4")
    assert "layer4.1" in message and "onnxcam nodes MODEL" in message
    with pytest.raises(OnnxcamError, match="closest: .*layer4.1"):
        resolve_node(model, "lyer4.1", candidates)


def test_table_marks_default_and_aligns_columns(legacy):
    model, candidates = legacy
    table = format_table(candidates, default_node(candidates, model))
    lines = table.splitlines()
    assert lines[0].split() == ["node", "op", "output", "tensor", "shape", "scope"]
    default_rows = [line for line in lines if line.startswith("*  ")]
    assert len(default_rows) == 1 and "/layer4/layer4.1/relu_1/Relu" in default_rows[0]
    assert "(?, 8, 8, 8)" in default_rows[0] and default_rows[0].rstrip().endswith("  layer4/layer4.1/relu_1")
    assert "  …_output_0  " in default_rows[0]  # the tensor name repeats the node name: abbreviated
    rows = lines[2:2 + len(candidates)]
    op_column = lines[0].index("op")
    assert all(row[op_column - 2:op_column] == "  " and row[op_column] != " " for row in rows)
    assert any(line.startswith("-  /avgpool/GlobalAveragePool") for line in rows)
    assert "default (--node auto): /layer4/layer4.1/relu_1/Relu" in table


# ---------------------------------------------------------------- hand-built graphs


def _weight(name, *shape):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def _model(nodes_, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes_, "g", inputs, outputs, list(initializers))
    # IR 8 so that the older onnxruntime-training build (the other test venv) loads it too
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _keras_mobilenet():
    """tf2onnx-style graph: NHWC input, Keras 3 `_1` scopes, Relu6 as Clip, channels-last before the pool."""
    scope = "functional_1/mobilenetv2_1.00_160_1"
    made = [
        helper.make_node("Transpose", ["image:0"], ["to_nchw:0"], name=f"{scope}/Conv1_1/convolution__6",
                         perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["to_nchw:0", "w", "b"], [f"{scope}/Conv1_1/convolution:0"],
                         name=f"{scope}/Conv1_1/convolution", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", [f"{scope}/Conv1_1/convolution:0", "zero", "six"],
                         [f"{scope}/out_relu_1/Relu6:0"], name=f"{scope}/out_relu_1/Relu6"),
        helper.make_node("Transpose", [f"{scope}/out_relu_1/Relu6:0"], [f"{scope}/out_relu_1/Relu6__12:0"],
                         name=f"{scope}/out_relu_1/Relu6__12", perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", [f"{scope}/out_relu_1/Relu6__12:0"], ["pooled:0"],
                         name="functional_1/global_average_pooling2d_1/Mean", axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["pooled:0", "fc"], ["logits:0"], name="functional_1/predictions_1/MatMul"),
    ]
    inits = [_weight("w", 16, 3, 3, 3), _weight("b", 16), _weight("fc", 16, 4),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6, np.float32), "six")]
    return _model(made, [_float("image:0", ["unk__1", 8, 8, 3])], [_float("logits:0", ["unk__1", 4])], inits)


def test_keras_layer_names_resolve_through_the_keras3_suffix():
    model = _keras_mobilenet()
    candidates = list_candidates(model)
    scope = "functional_1/mobilenetv2_1.00_160_1"
    by_name = {c.name: c for c in candidates}
    assert by_name[f"{scope}/out_relu_1/Relu6"].shape == (None, 16, 4, 4)
    assert by_name[f"{scope}/out_relu_1/Relu6"].scope == f"{scope}/out_relu_1"
    nhwc = by_name[f"{scope}/out_relu_1/Relu6__12"]
    assert nhwc.shape == (None, 4, 4, 16) and nhwc.spatial
    assert resolve_node(model, "out_relu", candidates) == nhwc  # the Keras layer's own NHWC output
    assert resolve_node(model, "out_relu/Relu6", candidates).name == f"{scope}/out_relu_1/Relu6"
    assert resolve_node(model, "out_relu_1", candidates) == nhwc
    assert resolve_node(model, "Conv1", candidates).op_type == "Conv"
    assert resolve_node(model, f"{scope}/out_relu_1/Relu6:0", candidates).op_type == "Clip"
    assert resolve_node(model, f"{scope}/out_relu_1/Relu6", candidates).op_type == "Clip"
    assert default_node(candidates, model) == nhwc  # ReduceMean over axes 1,2 of an NHWC map


def test_exact_names_beat_scopes():
    made = [helper.make_node("Conv", ["x", "w"], ["a"], name="layer4", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["b"], name="/layer4/block/Relu"),
            helper.make_node("Relu", ["b"], ["layer4/block"], name="/other/Relu")]
    model = _model(made, [_float("x", [1, 3, 6, 6])], [_float("layer4/block", None)], [_weight("w", 4, 3, 3, 3)])
    candidates = list_candidates(model)
    assert resolve_node(model, "layer4", candidates).name == "layer4"  # node name, not scope layer4
    assert resolve_node(model, "layer4/block", candidates).name == "/other/Relu"  # tensor, not scope
    assert resolve_node(model, "/layer4/block", candidates).name == "/layer4/block/Relu"  # no such tensor
    assert resolve_node(model, "layer4/block/Relu", candidates).name == "/layer4/block/Relu"


def _classifier(tail_ops, opset=17, reduce_axes_as_input=False):
    """x → Conv → Relu → [tail] → global pool → Flatten → Gemm, to check which layer `auto` picks."""
    made = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu")]
    inits = [_weight("w", 8, 3, 3, 3), _weight("fc", 5, 8)]
    last = "relu"
    for op in tail_ops:
        made.append(helper.make_node(op, [last], [op.lower()], name=op.lower()))
        last = op.lower()
    if reduce_axes_as_input:
        inits.append(numpy_helper.from_array(np.array([-2, -1], np.int64), "axes"))
        made.append(helper.make_node("ReduceMean", [last, "axes"], ["pooled"], name="pool", keepdims=1))
    else:
        made.append(helper.make_node("GlobalAveragePool", [last], ["pooled"], name="pool"))
    made += [helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="fc", transB=1)]
    return _model(made, [_float("x", [1, 3, 8, 8])], [_float("logits", [1, 5])], inits, opset)


def test_default_looks_through_trivia_and_reads_reduce_axes():
    for model in (_classifier(["Identity", "Dropout"]), _classifier([], opset=18, reduce_axes_as_input=True)):
        candidates = list_candidates(model)
        assert default_node(candidates, model).name == "relu"


def test_default_takes_the_last_global_pool_not_a_squeeze_excitation_one():
    made = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["conv"], ["se"], name="se/pool"),
            helper.make_node("Sigmoid", ["se"], ["gate"], name="se/gate"),
            helper.make_node("Mul", ["conv", "gate"], ["scaled"], name="se/scale"),
            helper.make_node("Conv", ["scaled", "w2"], ["head"], name="head", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["head"], ["pooled"], name="pool")]
    model = _model(made, [_float("x", [1, 3, 8, 8])], [_float("pooled", [1, 8, 1, 1])],
                   [_weight("w", 8, 3, 3, 3), _weight("w2", 8, 8, 3, 3)])
    assert default_node(list_candidates(model), model).name == "head"


def test_default_without_pool_is_the_last_spatial_node_and_flatten_counts_as_pool():
    made = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
            helper.make_node("Conv", ["relu", "w2"], ["mask"], name="mask_head")]
    model = _model(made, [_float("x", [1, 3, 8, 8])], [_float("mask", [1, 2, 8, 8])],
                   [_weight("w", 8, 3, 3, 3), _weight("w2", 2, 8, 1, 1)])
    assert default_node(list_candidates(model), model).name == "mask_head"
    made[2] = helper.make_node("Flatten", ["relu"], ["flat"], name="flatten")  # VGG-style head
    model = _model(made, [_float("x", [1, 3, 8, 8])], [_float("flat", [1, 512])], [_weight("w", 8, 3, 3, 3)])
    assert default_node(list_candidates(model), model).name == "relu"


def test_1d_and_3d_layers_are_candidates():
    made = [helper.make_node("Conv", ["s", "w1"], ["c1"], name="conv1d", pads=[1, 1]),
            helper.make_node("Conv", ["v", "w3"], ["c3"], name="conv3d", pads=[1, 1, 1, 1, 1, 1]),
            helper.make_node("ReduceSum", ["c1"], ["flat"], name="sum", axes=[1, 2], keepdims=0)]
    model = _model(made, [_float("s", [1, 2, 20]), _float("v", [1, 1, 4, 6, 6])],
                   [_float("flat", [1]), _float("c3", None)],
                   [_weight("w1", 4, 2, 3), _weight("w3", 3, 1, 3, 3, 3)], opset=11)
    shapes = {c.name: (c.shape, c.spatial) for c in list_candidates(model)}
    assert shapes == {"conv1d": ((1, 4, 20), True), "conv3d": ((1, 3, 4, 6, 6), True)}


@pytest.mark.parametrize("shape, spatial", [
    ((1, 512, 7, 7), True), ((1, 7, 7, 1280), True), ((None, 64, 100), True), ((1, 3, 4, 6, 6), True),
    ((1, 512, 1, 1), False), ((1, 1, 1, 1280), False), ((1, 64, 1), False), ((1, 1000), False), (None, False),
])
def test_has_spatial_axes(shape, spatial):
    assert has_spatial_axes(shape) is spatial


# ---------------------------------------------------------------- shapes from the probe run


def _symbolic_spatial_model():
    made = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool")]
    return _model(made, [_float("x", ["N", 3, "H", "W"])], [_float("pooled", ["N", 8, 1, 1])],
                  [_weight("w", 8, 3, 3, 3)])


def test_symbolic_spatial_input_needs_a_shape_in_one_line():
    with pytest.raises(OnnxcamError) as error:
        list_candidates(_symbolic_spatial_model())
    message = str(error.value)
    assert "\n" not in message and "'x'" in message and "H, W" in message
    assert "probe_input_shapes={'x': (1, 3, 224, 224)}" in message


def test_probe_measures_shapes_at_the_given_input_size():
    candidates = list_candidates(_symbolic_spatial_model(), {"x": (1, 3, 12, 10)})
    shapes = {c.name: c.shape for c in candidates}
    assert shapes == {"conv": (None, 8, 6, 5), "relu": (None, 8, 6, 5), "pool": (None, 8, 1, 1)}


def test_probe_resolves_a_reshape_whose_shape_inference_cannot_compute():
    made = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Floor", ["target"], ["floored"], name="floor"),
            helper.make_node("Cast", ["floored"], ["shape"], name="cast", to=TensorProto.INT64),
            helper.make_node("Reshape", ["conv", "shape"], ["reshaped"], name="reshape"),
            helper.make_node("Relu", ["reshaped"], ["y"], name="relu")]
    model = _model(made, [_float("x", [1, 3, 8, 8])], [_float("y", None)],
                   [_weight("w", 8, 3, 3, 3),
                    numpy_helper.from_array(np.array([1.2, 32.0, 4.1, 4.0], np.float32), "target")])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    reshaped = next(v for v in inferred.graph.value_info if v.name == "reshaped")
    assert not any(d.HasField("dim_value") for d in reshaped.type.tensor_type.shape.dim)  # inference gave up
    shapes = {c.name: c.shape for c in list_candidates(model)}
    assert shapes == {"conv": (1, 8, 8, 8), "reshape": (1, 32, 4, 4), "relu": (1, 32, 4, 4)}


def test_no_probe_when_inference_knows_every_shape(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("probe run although shape inference was enough")
    monkeypatch.setattr(nodes, "probe_shapes", refuse)
    candidates = list_candidates(_classifier([]))
    assert [(c.name, c.shape) for c in candidates] == [("conv", (1, 8, 8, 8)), ("relu", (1, 8, 8, 8)),
                                                       ("pool", (1, 8, 1, 1))]


def test_pads_computed_from_constants_keep_the_shapes_known():
    """PyTorch's EfficientNet export computes each "static padding" from constants (Constant ->
    Reshape -> Slice -> Transpose -> Reshape -> Cast -> Pad); ONNX shape inference reads pads only from
    initializers and Constant nodes, so the view folds such inputs first: every size after the Pad stays
    known, which spares the gradient graph its run-time Shape arithmetic."""
    from onnxcam.graph import GraphView
    c = lambda name, value: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))
    nodes = [
        c("flat", np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int64)),       # (begin, end) per axis
        c("pairs_shape", np.array([4, 2], np.int64)),
        helper.make_node("Reshape", ["flat", "pairs_shape"], ["pairs"]),
        helper.make_node("Transpose", ["pairs"], ["by_end"], perm=[1, 0]),
        c("row", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["by_end", "row"], ["pads_f"]),
        helper.make_node("Cast", ["pads_f"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["y"], ["pooled"]),
    ]
    graph = helper.make_graph(nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    view = GraphView(model)
    assert view.shape("padded") == ["N", 3, 11, 11]
    assert view.shape("y") == ["N", 4, 5, 5] and view.shape("pooled") == ["N", 4, 1, 1]
