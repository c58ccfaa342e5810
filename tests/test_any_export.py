"""Models the way other exporters and other tasks shape them, each against a torch reference on the
same weights (autograd for gradients, torch forward passes for Score-CAM; tests/torch_oracle.py):
a time-major (T, N, K) sequence output, a two-input net, a two-output net, a static-batch-1 export
given a batch of 3. Through the API and the CLI."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
import torch_oracle  # noqa: E402

from onnxcam import Explainer  # noqa: E402
from onnxcam.cli import main  # noqa: E402
from onnxcam.errors import OnnxcamError  # noqa: E402

METHODS = ["gradcam", "layercam", "hirescam", "scorecam"]
TOLERANCE = 1e-4   # final maps in [0, 1]; measured differences are ~1e-6


def export(module, examples, path, input_names, output_names, dynamic_axes=None):
    module.eval()
    torch.onnx.export(module, tuple(examples), str(path), dynamo=False, opset_version=17,
                      input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    return path


class TimeMajor(torch.nn.Module):
    """(N, 2, L) signal -> per-time-step class scores, written time-major (L, N, K) as RNN exports do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv1d(2, 6, 3, padding=1), torch.nn.ReLU())
        self.classify = torch.nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.classify(self.features(x)).permute(2, 0, 1)


class SummedOverTime(torch.nn.Module):
    """The score onnxcam takes for a sequence output without a mask: the class summed over time."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).sum(0)


@pytest.fixture(scope="module")
def time_major(tmp_path_factory):
    net = TimeMajor()
    path = export(net, [torch.zeros(1, 2, 32)], tmp_path_factory.mktemp("tm") / "time_major.onnx", ["signal"],
                  ["scores"], {"signal": {0: "batch"}, "scores": {1: "batch"}})
    return net, path


@pytest.mark.parametrize("method", METHODS)
def test_time_major_output_equals_torch(time_major, method):
    net, path = time_major
    x = np.random.default_rng(1).normal(size=(3, 2, 32)).astype(np.float32)
    targets = [1, 3, 0]
    explainer = Explainer(str(path), "features")
    result = explainer.explain(x, method=method, targets=targets)
    out = explainer.scored_output(x)
    assert (out.batch_axis, out.class_axis) == (1, 2)
    assert result.logits.shape == (3, 4, 32)      # canonical (N, K, T)
    expected = torch_oracle.reference_maps(method, SummedOverTime(net), net.features, x, targets)
    np.testing.assert_allclose(result.maps, expected, atol=TOLERANCE)
    np.testing.assert_allclose(result.scores, net(torch.from_numpy(x)).detach().numpy().sum(0)[
        np.arange(3), targets], rtol=1e-5)


def test_time_major_mask_restricts_the_positions(time_major):
    """--target-mask over the time axis: the score is the class summed over the masked steps only."""
    net, path = time_major
    x = np.random.default_rng(2).normal(size=(2, 2, 32)).astype(np.float32)
    mask = np.zeros(32, np.float32)
    mask[8:16] = 1

    class Masked(torch.nn.Module):
        def forward(self, signal):
            return (net(signal) * torch.from_numpy(mask)[:, None, None]).sum(0)

    got = Explainer(str(path), "features").explain(x, "gradcam", targets=2, target_mask=mask).maps
    expected = torch_oracle.reference_maps("gradcam", Masked(), net.features, x, [2, 2])
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_sequence_output_needs_a_target_in_one_line(time_major):
    with pytest.raises(OnnxcamError, match="say which class to explain with --target") as err:
        Explainer(str(time_major[1]), "features").explain(np.zeros((1, 2, 32), np.float32))
    assert "\n" not in str(err.value)


def test_class_axis_flag_and_its_errors(time_major):
    x = np.zeros((1, 2, 32), np.float32)
    explainer = Explainer(str(time_major[1]), "features", class_axis=-1)
    assert explainer.scored_output(x).class_axis == 2
    with pytest.raises(OnnxcamError, match="is the batch axis"):
        Explainer(str(time_major[1]), "features", class_axis=1).scored_output(x)


class TwoInputs(torch.nn.Module):
    """An image and a per-channel gain vector (a second, non-image input)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, image, gain):
        a = self.features(image) * gain[:, :, None, None]
        return self.fc(a.mean((2, 3)))


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    net = TwoInputs()
    path = export(net, [torch.zeros(1, 3, 16, 16), torch.ones(1, 8)],
                  tmp_path_factory.mktemp("two") / "two_inputs.onnx", ["image", "gain"], ["logits"],
                  {"image": {0: "batch"}, "gain": {0: "batch"}, "logits": {0: "batch"}})
    return net, path


@pytest.mark.parametrize("method", METHODS)
def test_two_input_model_explains_its_image_with_the_other_input_fed(two_inputs, method):
    net, path = two_inputs
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, size=8).astype(np.float32)   # one sample, repeated for the batch

    class WithGain(torch.nn.Module):
        def forward(self, image):
            return net(image, torch.from_numpy(np.repeat(gain[None], len(image), 0)))

    explainer = Explainer(str(path), "features", feeds={"gain": gain})
    assert explainer.model.input.name == "image"             # the only input with spatial axes
    result = explainer.explain(x, method=method)
    expected = torch_oracle.reference_maps(method, WithGain(), net.features, x, result.targets)
    np.testing.assert_allclose(result.maps, expected, atol=TOLERANCE)


def test_missing_feed_is_one_line_listing_the_inputs(two_inputs):
    with pytest.raises(OnnxcamError) as err:
        Explainer(str(two_inputs[1]), "features")
    assert str(err.value) == ("the model also takes gain (batch, 8) besides the explained input 'image'; give "
                              "each with --feed NAME=FILE.npy (API: feeds={...}) or choose another input to "
                              "explain with --input NAME")


def test_two_input_model_through_the_cli(two_inputs, tmp_path):
    net, path = two_inputs
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 16, 16)).astype(np.float32)
    gain = np.full((1, 8), 1.5, np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "gain.npy", gain)
    result = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "x.npy"), "--node", "features",
                                       "--feed", f"gain={tmp_path / 'gain.npy'}", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    from_cli = np.load(tmp_path / "o" / "x_gradcam.npy")
    from_api = Explainer(str(path), "features", feeds={"gain": gain}).explain(x[None]).maps[0]
    np.testing.assert_array_equal(from_cli, from_api)
    missing = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "x.npy"), "--out",
                                        str(tmp_path / "o2")])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: the model also takes gain")


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.head_a, self.head_b = torch.nn.Linear(8, 5), torch.nn.Linear(8, 3)

    def forward(self, image):
        pooled = self.features(image).mean((2, 3))
        return self.head_a(pooled), self.head_b(pooled)


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_two_output_model_scores_the_chosen_output(tmp_path, method):
    net = TwoOutputs()
    path = export(net, [torch.zeros(1, 3, 16, 16)], tmp_path / "two_out.onnx", ["image"], ["a", "b"],
                  {"image": {0: "batch"}, "a": {0: "batch"}, "b": {0: "batch"}})
    x = np.random.default_rng(5).normal(size=(2, 3, 16, 16)).astype(np.float32)

    class HeadB(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, image):
            return self.net(image)[1]

    result = Explainer(str(path), "features", output="b").explain(x, method=method)
    assert result.logits.shape == (2, 3)
    expected = torch_oracle.reference_maps(method, HeadB(), net.features, x, result.targets)
    np.testing.assert_allclose(result.maps, expected, atol=TOLERANCE)
    with pytest.raises(OnnxcamError, match=r"--output 'c' is not an output of the model; its outputs: a \("):
        Explainer(str(path), "features", output="c")


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "eigencam"])
def test_static_batch_one_export_explains_a_batch_of_three(tmp_path, method):
    net = TwoOutputs()

    class HeadA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, image):
            return self.net(image)[0]

    path = export(HeadA(), [torch.zeros(1, 3, 16, 16)], tmp_path / "static.onnx", ["image"], ["logits"])
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    x = np.random.default_rng(6).normal(size=(3, 3, 16, 16)).astype(np.float32)
    explainer = Explainer(str(path), "features")
    result = explainer.explain(x, method=method, targets=[0, 4, 2])
    one_by_one = np.concatenate([explainer.explain(x[i:i + 1], method=method, targets=[t]).maps
                                 for i, t in enumerate([0, 4, 2])])
    np.testing.assert_allclose(result.maps, one_by_one, atol=1e-6)
    if method != "eigencam":
        expected = torch_oracle.reference_maps(method, HeadA(), net.features, x, [0, 4, 2])
        np.testing.assert_allclose(result.maps, expected, atol=TOLERANCE)
