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


def export(module, examples, path, input_names, output_names, dynamic_axes=None, opset=17):
    module.eval()
    torch.onnx.export(module, tuple(examples), str(path), dynamo=False, opset_version=opset,
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
    def __init__(self, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
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


# ---- shapes only known at run time: the model is specialised to the batch's shape --------------

def tf2onnx_flatten_model():
    """A tf2onnx-style NHWC graph whose Flatten is Shape -> Gather -> Unsqueeze -> Concat -> Reshape:
    shape inference cannot tell the rank of the flattened tensor, so the backward graph is built for
    the batch's shape. Returns the model and a torch twin with the same weights."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.3, size=(8, 3, 3, 3)).astype(np.float32)
    b = (rng.normal(size=8) * 0.1).astype(np.float32)
    fc = rng.normal(scale=0.05, size=(16 * 16 * 8, 5)).astype(np.float32)
    fb = rng.normal(size=5).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for v, n in [(w, "conv/W"), (b, "conv/B"), (fc, "dense/W"),
             (fb, "dense/B"), (np.array(0, np.int64), "zero"), (np.array([0], np.int64), "axis0"),
             (np.array([-1], np.int64), "minus_one")]]
    nodes = [helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2], name="model/conv/Conv2D__6"),
             helper.make_node("Conv", ["nchw", "conv/W", "conv/B"], ["conv"], pads=[1, 1, 1, 1], name="model/conv/Conv2D"),
             helper.make_node("Relu", ["conv"], ["relu"], name="model/conv/Relu"),
             helper.make_node("Transpose", ["relu"], ["features"], perm=[0, 2, 3, 1], name="model/conv/Relu__9"),
             helper.make_node("Shape", ["features"], ["shape"], name="model/flatten/Shape"),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0, name="model/flatten/strided_slice"),
             helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch_1"], name="model/flatten/Unsqueeze"),
             helper.make_node("Concat", ["batch_1", "minus_one"], ["new_shape"], axis=0, name="model/flatten/shape"),
             helper.make_node("Reshape", ["features", "new_shape"], ["flat"], name="model/flatten/Reshape"),
             helper.make_node("MatMul", ["flat", "dense/W"], ["matmul"], name="model/dense/MatMul"),
             helper.make_node("Add", ["matmul", "dense/B"], ["logits"], name="model/dense/BiasAdd")]
    graph = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                                                ["unk__1", 16, 16, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["unk__2", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.relu = torch.nn.ReLU()
            self.dense = torch.nn.Linear(16 * 16 * 8, 5)
            with torch.no_grad():
                self.conv.weight.copy_(torch.from_numpy(w))
                self.conv.bias.copy_(torch.from_numpy(b))
                self.dense.weight.copy_(torch.from_numpy(fc.T.copy()))
                self.dense.bias.copy_(torch.from_numpy(fb))

        def forward(self, nhwc):
            a = self.relu(self.conv(nhwc.permute(0, 3, 1, 2)))
            return self.dense(a.permute(0, 2, 3, 1).reshape(len(nhwc), -1))

    return model, Twin().eval()


@pytest.mark.parametrize("method", ["gradcam", "layercam", "xgradcam"])
def test_tf2onnx_flatten_through_shape_ops_equals_torch(method, tmp_path):
    model, twin = tf2onnx_flatten_model()
    x = np.random.default_rng(7).normal(size=(2, 16, 16, 3)).astype(np.float32)
    explainer = Explainer(model, "features", grad_backend="portable")
    result = explainer.explain(x, method=method, targets=[1, 4])
    A, G, _ = torch_oracle.activations_and_gradients(twin, twin.relu, x, [1, 4])
    expected = torch_oracle.final_maps([torch_oracle.layer_map(method, A, G)], (16, 16))
    np.testing.assert_allclose(result.maps, expected, atol=TOLERANCE)
    path = tmp_path / "tf.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", x[0])
    cli = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "x.npy"), "--node", "features",
                                    "--method", method, "--target", "1", "--out", str(tmp_path / "o")])
    assert cli.exit_code == 0, cli.output
    np.testing.assert_allclose(np.load(tmp_path / "o" / f"x_{method}.npy"), expected[0], atol=TOLERANCE)


class Upsampler(torch.nn.Module):
    """A DBNet-like text-detection head: strided conv down, ConvTranspose back up to a per-pixel map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
        self.up = torch.nn.ConvTranspose2d(8, 2, 4, stride=2, padding=1)

    def forward(self, x):
        return self.up(self.features(x))


@pytest.mark.parametrize("size,backend", [((32, 32), "portable"), ((24, 40), "portable"), ((24, 40), "auto")])
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_opset12_free_height_width_convtranspose_head_with_a_mask(tmp_path, size, backend, method):
    """ConvTranspose's gradient has no CPU kernel in onnxruntime-training: auto takes the portable rules."""
    net = Upsampler().eval()
    path = export(net, [torch.zeros(1, 3, 32, 32)], tmp_path / "det.onnx", ["x"], ["prob_map"],
                  {"x": {0: "n", 2: "h", 3: "w"}, "prob_map": {0: "n", 2: "h", 3: "w"}}, opset=12)
    assert onnx.load(str(path)).opset_import[0].version == 12
    x = np.random.default_rng(8).normal(size=(2, 3, *size)).astype(np.float32)
    mask = np.zeros(size, np.float32)
    mask[4:12, 8:20] = 1

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, image):
            return (self.net(image) * torch.from_numpy(mask)).sum((2, 3))

    explainer = Explainer(str(path), "features", grad_backend=backend, input_shape=(1, 3, *size))
    result = explainer.explain(x, method, targets=1, target_mask=mask)
    assert explainer.gradient_backend_used == "portable"
    expected = torch_oracle.reference_maps(method, Masked(), net.features, x, [1, 1])
    np.testing.assert_allclose(result.maps, expected, atol=TOLERANCE)


# ---- sensible defaults, or a word when there are none ---------------------------------------------

class SideBranch(torch.nn.Module):
    """A classifier with an auxiliary pooled branch that only feeds a second output: the branch's
    pooling comes last in the graph (the old default's pick), yet it gives nothing for the first output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 5)
        self.aux = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3))), self.aux(x).mean((2, 3))


@pytest.fixture(scope="module")
def side_branch(tmp_path_factory):
    path = tmp_path_factory.mktemp("side") / "side.onnx"
    return export(SideBranch(), [torch.zeros(1, 3, 16, 16)], path, ["image"], ["logits", "aux_scores"],
                  {"image": {0: "n"}, "logits": {0: "n"}, "aux_scores": {0: "n"}})


def test_default_node_feeds_the_scored_output_and_the_table_marks_the_others(side_branch):
    explainer = Explainer(str(side_branch))
    assert explainer.nodes[0].scope.startswith("features")
    assert Explainer(str(side_branch), output="aux_scores").nodes[0].scope.startswith("aux")
    result = CliRunner().invoke(main, ["nodes", str(side_branch)])
    assert result.exit_code == 0, result.output
    aux_rows = [line for line in result.output.splitlines() if line.startswith("x ") and "/aux/" in line]
    assert len(aux_rows) == 2            # its Conv and Relu
    assert "x does not feed the model's first output" in result.output


def test_a_node_off_the_scored_path_is_an_error_not_a_blank_map(side_branch):
    explainer = Explainer(str(side_branch), "aux")
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(OnnxcamError, match=r"does not feed the scored output 'logits', so gradcam has nothing"):
        explainer.explain(x, "gradcam")
    assert explainer.explain(x, "eigencam").maps.shape == (1, 16, 16)   # needs no target


def test_notices_for_a_blank_map_a_preprocessing_fallback_and_skipped_methods(tmp_path):
    """A linear model whose class-0 evidence is negative everywhere: Grad-CAM is all zero, and says why."""
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    fc = numpy_helper.from_array(np.array([[-1.0, 1.0], [-1.0, 1.0]], np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv"),
         helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
         helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
         helper.make_node("Flatten", ["pool"], ["flat"]),
         helper.make_node("MatMul", ["flat", "fc"], ["logits"])],
        "negative", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], [w, fc])
    path = tmp_path / "negative.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    import cv2
    cv2.imwrite(str(tmp_path / "photo.png"), np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8))
    result = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "photo.png"), "--target", "0",
                                       "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    import json
    summary = json.loads(result.stdout)
    assert summary["results"][0]["notice"].startswith(
        "the map is zero everywhere: the evidence for class 0 at node relu is negative everywhere")
    assert any("no preprocessing metadata" in n for n in summary["notices"])
    assert "notice: " in result.stderr and "negative everywhere" in result.stderr
    everything = CliRunner().invoke(main, ["explain", str(path), str(tmp_path / "photo.png"), "--method", "all",
                                           "--preset", "imagenet", "--out", str(tmp_path / "o2"), "--json"])
    assert everything.exit_code == 0, everything.output
    notices = json.loads(everything.stdout)["notices"]
    assert not any("preprocessing" in n for n in notices)   # --preset given: no fallback
    assert [n for n in notices if n.startswith("--method all skips")] == [   # every CNN method applies here
        "--method all skips legrad: LeGrad needs a vision transformer: this graph has no attention Softmax "
        "over the key axis"]


def test_size_sets_the_length_of_a_signal_model_with_a_symbolic_length(tmp_path):
    """--size L for rank-3 inputs (the symbolic-axes error tells the user to pass it)."""
    net = TimeMajor()
    path = export(net, [torch.zeros(1, 2, 32)], tmp_path / "free_length.onnx", ["signal"], ["scores"],
                  {"signal": {0: "batch", 2: "length"}, "scores": {0: "length", 1: "batch"}})
    np.save(tmp_path / "s.npy", np.random.default_rng(9).normal(size=(2, 40)).astype(np.float32))
    base = ["explain", str(path), str(tmp_path / "s.npy"), "--node", "features", "--target", "1"]
    without = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "a")])
    assert without.exit_code == 1 and "--size" in without.stderr
    result = CliRunner().invoke(main, [*base, "--size", "40", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "b" / "s_gradcam.npy").shape == (40,)
    wrong = CliRunner().invoke(main, [*base, "--size", "40,40", "--out", str(tmp_path / "c")])
    assert wrong.exit_code == 1 and "has 1 spatial axes; give L" in wrong.stderr


class Recogniser(torch.nn.Module):
    """A text-recogniser-like net: an image in, per-column class scores out, batch-first (N, T, K)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU())
        self.classify = torch.nn.Conv2d(6, 4, 1)

    def forward(self, image):
        return self.classify(self.features(image)).mean(2).permute(0, 2, 1)


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_batch_first_sequence_output_of_an_image_model(tmp_path, method):
    """(N, T, K) from an image: the class axis is the last one (not a map's axis 1)."""
    net = Recogniser().eval()
    path = export(net, [torch.zeros(1, 3, 8, 24)], tmp_path / "rec.onnx", ["image"], ["scores"],
                  {"image": {0: "n"}, "scores": {0: "n"}})
    x = np.random.default_rng(10).normal(size=(2, 3, 8, 24)).astype(np.float32)
    explainer = Explainer(str(path), "features")
    result = explainer.explain(x, method=method, targets=[3, 0])
    assert (explainer.scored_output(x).batch_axis, explainer.scored_output(x).class_axis) == (0, 2)

    class Summed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, image):
            return self.net(image).sum(1)

    expected = torch_oracle.reference_maps(method, Summed(), net.features, x, [3, 0])
    np.testing.assert_allclose(result.maps, expected, atol=TOLERANCE)


def test_export_augmented_of_a_two_input_two_output_model(tmp_path):
    """--input, --feed, --output and --class-axis reach export-augmented as they reach explain: the
    written model keeps the other input as an input, scores the output asked for, and its gradient is
    torch's d logit / d activation for the values fed at run time."""
    import onnxruntime as ort

    class TwoInTwoOut(TwoOutputs):
        def forward(self, image, gain):
            pooled = (self.features(image) * gain[:, :, None, None]).mean((2, 3))
            return self.head_a(pooled), self.head_b(pooled)

    net = TwoInTwoOut(seed=6).eval()
    path = export(net, [torch.zeros(1, 3, 16, 16), torch.ones(1, 8)], tmp_path / "m.onnx", ["image", "gain"],
                  ["a", "b"], {"image": {0: "batch"}, "gain": {0: "batch"}, "a": {0: "batch"}, "b": {0: "batch"}})
    np.save(tmp_path / "gain.npy", np.ones((1, 8), np.float32))
    out = tmp_path / "augmented.onnx"
    invoke = lambda *args: CliRunner().invoke(main, ["export-augmented", str(path), *map(str, args)])  # noqa: E731
    result = invoke("--node", "features", "--input", "image", "--feed", f"gain={tmp_path / 'gain.npy'}",
                    "--output", "b", "--class-axis", "1", "-o", out)
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "gain", "onnxcam_target_weights"]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, size=(2, 8)).astype(np.float32)
    logits, activations, gradients = session.run(None, {"image": x, "gain": gain,
                                                        "onnxcam_target_weights": np.zeros((2, 3), np.float32)})
    a = net.features(torch.from_numpy(x))
    a.retain_grad()
    pooled = (a * torch.from_numpy(gain)[:, :, None, None]).mean((2, 3))
    scores = net.head_b(pooled)
    scores.gather(1, scores.argmax(1, keepdim=True)).sum().backward()
    np.testing.assert_allclose(logits, scores.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(activations, a.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(gradients, a.grad.numpy(), atol=1e-6)
    missing = invoke("--node", "features", "-o", tmp_path / "m2.onnx")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: the model also takes gain")
    assert not (tmp_path / "m2.onnx").exists()
    old_flag = invoke("--feed", f"gain={tmp_path / 'gain.npy'}", "--output", tmp_path / "m3.onnx")
    assert old_flag.exit_code == 1 and old_flag.stderr == (
        f"error: --output names the output to score (one of a, b); write the model with -o/--out "
        f"{tmp_path / 'm3.onnx'}\n")
    assert not (tmp_path / "m3.onnx").exists()
    no_out = invoke("--feed", f"gain={tmp_path / 'gain.npy'}")
    assert no_out.exit_code == 1 and no_out.stderr == "error: give the file to write the augmented model to with -o/--out FILE.onnx\n"
