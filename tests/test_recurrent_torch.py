"""Recurrent nets exported from torch: CAMs at a conv feature map that feeds an LSTM, GRU or RNN equal
the torch reference (autograd through torch's own recurrent layers, tests/torch_oracle.py), and the
portable gradient at that map equals torch autograd."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from onnxcam import Explainer  # noqa: E402
from onnxcam.gradients import gradient_name, portable  # noqa: E402
import torch_oracle  # noqa: E402
from gradient_checks import session  # noqa: E402
from torch_export import export_dynamo, export_legacy  # noqa: E402

TOLERANCE = 1e-5   # measured: at most 8e-7 over these nets and methods (legacy and dynamo exports)
CLASSES = 5


class ConvRecurrent(nn.Module):
    """conv1d features (N, C, L) -> recurrent layer over L -> mean or last step -> linear classifier."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False, pooling: str = "mean"):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1),
                                      nn.ReLU())
        recurrent = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.recurrent = recurrent(8, 6, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.pooling = pooling
        self.fc = nn.Linear(6 * (2 if bidirectional else 1), CLASSES)

    def forward(self, x):
        seq, _ = self.recurrent(self.features(x).transpose(1, 2))   # (N, L, D*H)
        if self.pooling == "time-major":   # per-step logits, (L, N, K) as sequence taggers emit them
            return self.fc(seq).transpose(0, 1)
        return self.fc(seq.mean(1) if self.pooling == "mean" else seq[:, -1])


NETS = {
    "lstm-bidirectional-2-layers": dict(kind="lstm", layers=2, bidirectional=True),
    "gru-last-step": dict(kind="gru", pooling="last"),
    "gru-bidirectional": dict(kind="gru", bidirectional=True),
    "rnn-tanh": dict(kind="rnn", layers=2),
}


# outputs the Explainer does not read yet (issue 9's output-shape work): raw gradients only
RAW_ONLY = {"lstm-time-major-output": dict(kind="lstm", bidirectional=True, pooling="time-major")}


def _net(name):
    torch.manual_seed(len(name))
    return ConvRecurrent(**{**NETS, **RAW_ONLY}[name]).eval()


def _input(batch=3, length=12, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 3, length)).astype(np.float32)


@pytest.fixture(scope="module", params=list(NETS))
def exported(request, tmp_path_factory):
    net, x = _net(request.param), _input()
    path = export_legacy(net, torch.from_numpy(x[:1]), tmp_path_factory.mktemp("rnn") / f"{request.param}.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops & {"LSTM", "GRU", "RNN"}, ops
    return request.param, net, x, str(path)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam", "xgradcam"])
def test_gradient_maps_equal_torch_reference(exported, method):
    name, net, x, path = exported
    explainer = Explainer(path, "features.3", grad_backend="portable")
    targets = [1, 4, 0]
    result = explainer.explain(x, method=method, targets=targets)
    reference = torch_oracle.reference_maps(method, net, net.features[3], x, targets)
    assert result.maps.shape == reference.shape == (3, 12)
    np.testing.assert_allclose(result.maps, reference, atol=TOLERANCE)


@pytest.mark.parametrize("name", ["lstm-bidirectional-2-layers", "gru-bidirectional"])
def test_dynamo_export_equals_torch_reference(name, tmp_path):
    """The dynamo exporter keeps LSTM and GRU as ONNX ops (nn.RNN it decomposes into MatMul/Tanh per
    step, which other rules cover); it may fix the batch at the example's size, so the batch here is
    that size."""
    net, x = _net(name), _input(batch=1, seed=2)
    path = export_dynamo(net, torch.from_numpy(x), tmp_path / "net.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("LSTM" in ops) == (NETS[name]["kind"] == "lstm") and ("GRU" in ops) == (NETS[name]["kind"] == "gru")
    result = Explainer(str(path), "features.3", grad_backend="portable").explain(x, "gradcam", targets=[3])
    reference = torch_oracle.reference_maps("gradcam", net, net.features[3], x, [3])
    np.testing.assert_allclose(result.maps, reference, atol=TOLERANCE)


def test_auto_backend_uses_the_portable_rules(exported):
    name, net, x, path = exported
    explainer = Explainer(path, "features.3")
    np.testing.assert_allclose(explainer.explain(x, "gradcam", targets=[2, 2, 3]).maps,
                               torch_oracle.reference_maps("gradcam", net, net.features[3], x, [2, 2, 3]),
                               atol=TOLERANCE)
    assert explainer.gradient_backend_used == "portable"


@pytest.mark.parametrize("name", list(NETS) + list(RAW_ONLY))
def test_gradient_at_the_feature_map_equals_autograd(name, tmp_path):
    """The raw d sum(logits) / d feature map, before any CAM maths, against autograd (measured: at most
    2.7e-7 of the largest gradient)."""
    net, x = _net(name), _input(batch=2, seed=1)
    model = onnx.load(str(export_legacy(net, torch.from_numpy(x[:1]), tmp_path / "net.onnx")))
    feature = next(n.output[0] for n in model.graph.node if n.name == "/features/features.3/Relu")
    model.graph.node.extend([onnx.helper.make_node("ReduceSum", ["logits"], ["score"], keepdims=0)])
    built = portable.build(model, "score", [feature])
    onnx.checker.check_model(built, full_check=True)
    ours = session(built).run([gradient_name(feature)], {"input": x})[0]
    features = net.features(torch.from_numpy(x)).detach().requires_grad_(True)
    seq, _ = net.recurrent(features.transpose(1, 2))
    pooled = {"mean": lambda: seq.mean(1), "last": lambda: seq[:, -1], "time-major": lambda: seq}[net.pooling]()
    net.fc(pooled).sum().backward()
    reference = features.grad.numpy()
    assert np.abs(reference).max() > 0
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= 3e-6


def _time_major_reference(method, net, x, targets):
    """torch: A and d(sum over t of logits[t, n, target_n]) / dA at features[3], then the CAM maths."""
    captured = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured.append(out)

    handle = net.features[3].register_forward_hook(keep)
    try:
        logits = net(torch.from_numpy(x))                       # (T, N, K)
        logits[:, torch.arange(len(x)), torch.as_tensor(targets)].sum().backward()
    finally:
        handle.remove()
    A, G = captured[0].detach().numpy(), captured[0].grad.numpy()
    return torch_oracle.final_maps([torch_oracle.layer_map(method, A, G)], x.shape[2:])


@pytest.fixture(scope="module")
def time_major_net(tmp_path_factory):
    name = "lstm-time-major-output"
    net, x = _net(name), _input()
    path = tmp_path_factory.mktemp("tm") / "tm.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {1: "batch"}})
    return net, x, str(path)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam", "xgradcam", "eigencam"])
def test_time_major_output_through_the_api_equals_torch(time_major_net, method):
    """A bidirectional LSTM tagger with a (T, N, K) output: the score of class k sums its logits over
    time (onnxcam finds the batch on axis 1); the maps equal the torch reference."""
    net, x, path = time_major_net
    targets = [1, 4, 0]
    result = Explainer(path, "features.3").explain(x, method=method, targets=targets)
    reference = _time_major_reference(method, net, x, targets)
    np.testing.assert_allclose(result.maps, reference, atol=TOLERANCE)


def test_time_major_output_through_the_cli_equals_the_api(time_major_net, tmp_path):
    from user_path import run_cli
    net, x, path = time_major_net
    np.save(tmp_path / "signal.npy", x[0])
    result = run_cli("explain", path, tmp_path / "signal.npy", "--node", "features.3", "--target", "3",
                     "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    from_cli = np.load(tmp_path / "out" / "signal_gradcam.npy")
    np.testing.assert_allclose(from_cli, _time_major_reference("gradcam", net, x[:1], [3])[0], atol=TOLERANCE)
