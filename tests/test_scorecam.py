"""Score-CAM weights on tiny NumPy "models" (linear maps computed row by row): a hand example, a direct
all-at-once implementation, chunking, constant channels scored once, Faster Score-CAM, and the masks
against torch's corner-aligned interpolation."""
import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.methods.scorecam import channel_masks, kept_channels, scorecam_weights


def torch_interpolate(array, size, mode, align_corners):
    """torch.nn.functional.interpolate as the reference (skipped where torch is not installed)."""
    torch = pytest.importorskip("torch")
    return torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(array)), size=size, mode=mode,
                                           align_corners=align_corners).numpy()


class LinearModel:
    """logits[k] = Σ V[k] · x, one row at a time (so results never depend on the batch size); counts rows."""

    def __init__(self, V):
        self.V = np.asarray(V, dtype=np.float64)
        self.rows = 0
        self.batches = []

    def __call__(self, batch):
        self.rows += len(batch)
        self.batches.append(len(batch))
        return np.stack([(self.V * row).reshape(len(self.V), -1).sum(axis=1) for row in batch])


def _softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


def test_hand_example_1d():
    x = np.array([[[1, 2, 3]]], dtype=np.float32)              # (N=1, Cin=1, L=3)
    A = np.array([[[0, 1], [2, 2]]], dtype=np.float32)          # channel 0 varies, channel 1 is constant
    model = LinearModel([[[1, 1, 1]], [[1, 0, 0]]])             # logits: (sum of x, first element)
    # channel 0: corner-aligned upsampling gives (0, 0.5, 1), masked input (0, 1, 3), target logit 4;
    # channel 1: all-zero mask, masked input 0, logit 0 → softmax(4, 0)
    w = scorecam_weights(A, x, np.array([0]), model)
    np.testing.assert_allclose(w[0], [np.exp(4) / (np.exp(4) + 1), 1 / (np.exp(4) + 1)], rtol=1e-6)
    assert model.rows == 2


def _direct_scorecam(A, x, targets, model):
    """Score-CAM as written in the paper / pytorch-grad-cam: every masked input built at once."""
    size = x.shape[2:]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    up = torch_interpolate(A, size, mode, True)
    flat = up.reshape(up.shape[0], up.shape[1], -1)
    low, high = flat.min(axis=2), flat.max(axis=2)
    masks = (up - low.reshape(low.shape + (1,) * len(size))) / (high - low + 1e-8).reshape(
        high.shape + (1,) * len(size))
    weights = []
    for n in range(len(x)):
        masked = x[n][None] * masks[n][:, None]                  # (C, Cin, *size)
        weights.append(_softmax(model(masked)[:, targets[n]]))
    return np.array(weights)


@pytest.mark.parametrize("spatial, size", [((3,), (10,)), ((3, 4), (7, 9)), ((2, 2, 3), (4, 5, 5))])
def test_matches_direct_implementation(spatial, size):
    rng = np.random.default_rng(len(size))
    A = rng.random((2, 5) + spatial, dtype=np.float32)
    x = rng.standard_normal((2, 2) + size).astype(np.float32)
    model = LinearModel(rng.standard_normal((3, 2) + size))
    targets = np.array([2, 0])
    expected = _direct_scorecam(A, x, targets, LinearModel(model.V))
    got = scorecam_weights(A, x, targets, model, batch_size=4)
    assert got.shape == (2, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1, rtol=1e-6)


def test_chunked_and_unchunked_runs_give_identical_weights():
    rng = np.random.default_rng(7)
    A = rng.random((3, 7, 3, 3), dtype=np.float32)
    A[1, 2] = 0                                                  # a dead channel too
    x = rng.standard_normal((3, 3, 6, 6)).astype(np.float32)
    V = rng.standard_normal((4, 3, 6, 6))
    targets = np.array([1, 3, 0])
    runs = {}
    for batch_size in (1, 3, 5, 64):
        model = LinearModel(V)
        runs[batch_size] = scorecam_weights(A, x, targets, model, batch_size=batch_size)
        assert max(model.batches) <= batch_size
    for batch_size, weights in runs.items():
        np.testing.assert_array_equal(weights, runs[64], err_msg=f"batch_size={batch_size}")


def test_constant_channels_are_scored_once_per_sample():
    rng = np.random.default_rng(8)
    A = rng.random((2, 5, 3, 3), dtype=np.float32)
    A[:, 1] = 0                                                  # dead (ReLU) channel
    A[:, 3] = 2.5                                                # constant non-zero channel
    A[0, 4] = -1.0
    x = rng.standard_normal((2, 1, 5, 5)).astype(np.float32)
    model = LinearModel(rng.standard_normal((2, 1, 5, 5)))
    targets = np.array([0, 1])
    w = scorecam_weights(A, x, targets, model, batch_size=3)
    assert model.rows == (2 + 1) + (3 + 1)                       # varying channels + one zero input each
    # every constant channel has the weight of the all-zero input, as if each were scored on its own
    zero_logit = 0.0
    for n, varying in ((0, [0, 2]), (1, [0, 2, 4])):
        masks = channel_masks(A[n], (5, 5))
        scores = [zero_logit if k not in varying else LinearModel(model.V)(x[n] * masks[k][None])[0][targets[n]]
                  for k in range(5)]
        np.testing.assert_allclose(w[n], _softmax(np.array(scores)), rtol=1e-5)
    assert w[0, 1] == w[0, 3] == w[0, 4]


def test_progress_reports_rows_up_to_the_total():
    rng = np.random.default_rng(9)
    A = rng.random((2, 4, 2, 2), dtype=np.float32)
    A[0, 0] = 0
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    calls = []
    scorecam_weights(A, x, np.array([0, 0]), LinearModel(np.ones((1, 1, 4, 4))), batch_size=3,
                     progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (8, 8)  # (3 varying + 1 zero input) + 4 varying
    assert [d for d, _ in calls] == [3, 6, 8]


def test_faster_scorecam_keeps_the_most_varying_channels():
    rng = np.random.default_rng(10)
    A = rng.random((2, 6, 3, 3), dtype=np.float32)
    A[0, [1, 4]] *= 10                                           # sample 0: channels 1 and 4 vary most
    A[1, [0, 5]] *= 10                                           # sample 1: channels 0 and 5
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    V = rng.standard_normal((3, 2, 6, 6))
    targets = np.array([2, 1])
    model = LinearModel(V)
    w = scorecam_weights(A, x, targets, model, max_channels=2)
    assert model.rows == 4
    for n, kept in ((0, [1, 4]), (1, [0, 5])):
        np.testing.assert_array_equal(kept_channels(A[n], 2), kept)
        assert np.count_nonzero(w[n]) == 2
        # softmax over the kept channels only = Score-CAM on those channels alone
        alone = scorecam_weights(A[n:n + 1, kept], x[n:n + 1], targets[n:n + 1], LinearModel(V))
        np.testing.assert_allclose(w[n, kept], alone[0], rtol=1e-6)
    full = scorecam_weights(A, x, targets, LinearModel(V))
    np.testing.assert_array_equal(scorecam_weights(A, x, targets, LinearModel(V), max_channels=6), full)


@pytest.mark.parametrize("spatial, size, mode", [((4,), (11,), "linear"), ((3, 5), (8, 13), "bilinear"),
                                                 ((7, 7), (224, 224), "bilinear"),
                                                 ((2, 3, 2), (5, 4, 6), "trilinear")])
def test_channel_masks_match_torch_align_corners(spatial, size, mode):
    A = np.random.default_rng(11).random((6,) + spatial, dtype=np.float32)
    up = torch_interpolate(A[None], size, mode, True)[0]
    flat = up.reshape(6, -1)
    shape = (6,) + (1,) * len(size)
    low, high = flat.min(axis=1).reshape(shape), flat.max(axis=1).reshape(shape)
    expected = (up - low) / (high - low + np.float32(1e-8))
    masks = channel_masks(A, size)
    assert masks.shape == (6,) + size and masks.dtype == np.float32
    np.testing.assert_allclose(masks, expected, atol=2e-6)


def test_constant_channel_mask_is_exactly_zero():
    A = np.full((1, 7, 7), 0.3, dtype=np.float32)
    assert not channel_masks(A, (224, 224)).any()


def test_input_and_node_must_share_spatial_rank():
    with pytest.raises(OnnxcamError, match="spatial rank"):
        scorecam_weights(np.ones((1, 2, 3, 3), np.float32), np.ones((1, 3, 8), np.float32), np.array([0]),
                         LinearModel(np.ones((1, 3, 8))))
