"""Portable gradients on a torch-exported residual conv net (BatchNorm, MaxPool, Add, Relu, Gemm) vs
torch autograd, for an early and a late layer."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from gradient_checks import session

from onnxcam.gradients import gradient_name, portable

torch = pytest.importorskip("torch")


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
