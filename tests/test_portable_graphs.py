"""Portable gradients through whole graphs: fan-out, integer shape paths, and a torch-exported conv net."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx import helper as h
from test_portable_rules import finite_differences, gradients, graph_model, rand, session

from onnxcam.gradients import gradient_name, portable


def cut_at(model: onnx.ModelProto, tensor: str, value: np.ndarray) -> onnx.ModelProto:
    """The same model with ``tensor`` turned into a graph input (its producers dropped if unused)."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    nodes = [n for n in cut.graph.node if tensor not in n.output]
    needed, kept = {o.name for o in cut.graph.output}, []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    del cut.graph.node[:]
    cut.graph.node.extend(reversed(kept))
    cut.graph.input.append(h.make_tensor_value_info(tensor, TensorProto.DOUBLE, value.shape))
    return cut


def test_fan_out_accumulates_and_intermediate_wrt():
    """a feeds four consumers (one of them twice); wrt both x and a = f(x): d/dx is the total derivative."""
    x = rand(2, 3)
    nodes = [
        h.make_node("Tanh", ["x"], ["a"]),
        h.make_node("Mul", ["a", "a"], ["sq"]),
        h.make_node("Sigmoid", ["a"], ["s"]),
        h.make_node("Add", ["sq", "s"], ["t"]),
        h.make_node("Concat", ["t", "a"], ["cat"], axis=1),
        h.make_node("Mul", ["cat", "cat"], ["y0"]),
        h.make_node("Concat", ["x", "x"], ["xx"], axis=1),
        h.make_node("Sub", ["y0", "xx"], ["y"]),
    ]
    model = graph_model(nodes, {"x": x})
    gx, ga = gradients(model, {"x": x}, ["x", "a"])
    np.testing.assert_allclose(gx, finite_differences(model, {"x": x}, "x", 1e-6), rtol=1e-6, atol=1e-9)
    a = np.tanh(x)
    cut = cut_at(model, "a", a)
    np.testing.assert_allclose(ga, finite_differences(cut, {"x": x, "a": a}, "a", 1e-6), rtol=1e-6, atol=1e-9)


def test_integer_shape_path_is_constant():
    """Shape -> Gather -> Concat -> Reshape: the shape arithmetic is int64 and is not differentiated."""
    x = rand(2, 3, 4)
    consts = {"zero": np.array(0, np.int64), "rest": np.array([-1], np.int64), "axes": np.array([0], np.int64)}
    nodes = [
        h.make_node("Relu", ["x"], ["r"]),
        h.make_node("Shape", ["r"], ["shape"]),
        h.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        h.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        h.make_node("Concat", ["n1", "rest"], ["target"], axis=0),
        h.make_node("Reshape", ["r", "target"], ["flat"]),
        h.make_node("Softmax", ["flat"], ["p"], axis=1),
        h.make_node("Mul", ["p", "flat"], ["y"]),
        h.make_node("Mul", ["y", "y"], ["y2"]),
        h.make_node("ReduceSum", ["y2"], ["score"], keepdims=0),
    ]
    model = graph_model(nodes, {"x": x}, consts, outputs=("y",), score_of=None)
    model.graph.output.append(h.make_tensor_value_info("score", TensorProto.DOUBLE, []))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    built = portable.build(model, "score", ["x"])
    onnx.checker.check_model(built, full_check=True)
    for batch in (2, 3):  # the batch size is read at run time, not baked into the backward graph
        xb = rand(batch, 3, 4, seed=batch)
        xb = np.where(np.abs(xb) < 0.05, 0.1, xb)
        (g,) = session(built).run([gradient_name("x")], {"x": xb})
        np.testing.assert_allclose(g, finite_differences(model, {"x": xb}, "x", 1e-6), rtol=1e-6, atol=1e-9)


class Block(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = (torch.nn.Identity() if stride == 1 and cin == cout
                         else torch.nn.Conv2d(cin, cout, 1, stride, bias=False))
        self.relu2 = torch.nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 5, 2, 2)
        self.stem_relu = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.pool_bn = torch.nn.BatchNorm2d(8)  # after a pool, so the exporter keeps a BatchNormalization node
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool_bn(self.pool(self.stem_relu(self.stem(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.gap(x), 1))


@pytest.fixture(scope="module")
def torch_net():
    torch.manual_seed(0)
    net = SmallNet()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _export(net, x, path, opset):
    torch.onnx.export(net, x, path, dynamo=False, opset_version=opset, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load(path)


def _with_score_head(model: onnx.ModelProto) -> onnx.ModelProto:
    """score = ReduceSum(logits * W) with W the graph input onnxcam_target_weights."""
    model.graph.input.append(h.make_tensor_value_info("onnxcam_target_weights", TensorProto.FLOAT, ["batch", 10]))
    model.graph.node.extend([h.make_node("Mul", ["logits", "onnxcam_target_weights"], ["zw"]),
                             h.make_node("ReduceSum", ["zw"], ["score"], keepdims=0)])
    return model


def _output_of(model: onnx.ModelProto, node_name: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == node_name)


@pytest.mark.parametrize("opset", [13, 17])
def test_torch_conv_net_matches_autograd(torch_net, tmp_path, opset):
    """d logit / d activation for an early (stem ReLU) and a late (last block ReLU) layer vs torch."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _with_score_head(_export(torch_net, x, str(tmp_path / "net.onnx"), opset))
    early, late = _output_of(model, "/stem_relu/Relu"), _output_of(model, "/layer2/relu2/Relu")
    assert {n.op_type for n in model.graph.node} >= {"Conv", "BatchNormalization", "MaxPool", "Add", "Relu",
                                                    "Gemm", "GlobalAveragePool", "Flatten"}
    assert portable.unsupported_ops(model, "score", [early, late]) == []
    built = portable.build(model, "score", [early, late])
    onnx.checker.check_model(built, full_check=True)

    captured = {}
    hooks = [m.register_forward_hook(lambda mod, i, out, key=key: captured.__setitem__(key, out))
             for key, m in (("early", torch_net.stem_relu), ("late", torch_net.layer2.relu2))]
    try:
        logits = torch_net(x)
    finally:
        for hook in hooks:
            hook.remove()
    for t in captured.values():
        t.retain_grad()
    classes = [2, 7, 2]
    weights = torch.zeros(3, 10)
    weights[range(3), classes] = 1
    (logits * weights).sum().backward()

    g_early, g_late, onnx_logits = session(built).run(
        [gradient_name(early), gradient_name(late), "logits"],
        {"input": x.numpy(), "onnxcam_target_weights": weights.numpy()})
    np.testing.assert_allclose(onnx_logits, logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    for ours, key in ((g_early, "early"), (g_late, "late")):
        reference = captured[key].grad.numpy()
        assert np.abs(reference).max() > 0
        assert np.abs(ours - reference).max() / np.abs(reference).max() <= 1e-5, key
