"""Score-CAM channel weights: how much the target logit responds to the input masked by each channel.

As pytorch-grad-cam's ScoreCAM: each channel map A_k is upsampled to the input size with corners
aligned (``torch.nn.UpsamplingBilinear2d``; linear / trilinear for 1D / 3D), normalised to
(M - min) / (max - min + 1e-8), the input is multiplied by it, the model scores the masked input with the
target logit, and the weights are a softmax of those scores over the channels.

Two exact savings: masks are built and scored ``batch_size`` at a time (memory stays bounded), and a
channel with constant activations gives an all-zero mask, so its masked input is the same for every such
channel and is scored once per sample. (Interpolating as x0 + t·(x1 - x0) keeps a constant map exactly
constant; PyTorch's upsampling leaves ~1e-8 rounding noise there, which its normalisation then blows up
into an arbitrary mask — we give the exact zero mask instead.)

``max_channels=K`` is Faster Score-CAM (tabayashi0117, https://github.com/tabayashi0117/Score-CAM
#faster-score-cam; also ``max_N`` in tf-keras-vis): only the K channels whose activation maps vary the
most (spatial variance, per sample) are scored; the softmax runs over those K scores and every other
channel gets weight 0 — i.e. Score-CAM computed on the kept channels alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import OnnxcamError
from ._arrays import as_activations
from .interpolation import linear_resize

MASK_EPS = 1e-8


def channel_masks(A_sample, size: Sequence[int]) -> np.ndarray:
    """Masks (C, *size) float32 in [0, 1] for one sample's activations (C, *S)."""
    upsampled = linear_resize(np.asarray(A_sample, dtype=np.float32), tuple(size), align_corners=True)
    axes = tuple(range(1, upsampled.ndim))
    low = upsampled.min(axis=axes, keepdims=True)
    high = upsampled.max(axis=axes, keepdims=True)
    return ((upsampled - low) / (high - low + np.float32(MASK_EPS))).astype(np.float32)


def kept_channels(A_sample: np.ndarray, max_channels: int | None) -> np.ndarray:
    """Indices of the channels to score: all, or the ``max_channels`` with the highest spatial variance."""
    C = A_sample.shape[0]
    if max_channels is None or max_channels >= C:
        return np.arange(C)
    variance = A_sample.reshape(C, -1).astype(np.float64).var(axis=1)
    return np.sort(np.argsort(-variance, kind="stable")[:max_channels])


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the channels' scores: the Score-CAM weights."""
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def checked_inputs(A, x, targets, batch_size: int, max_channels: int | None):
    """A, x and targets as arrays, or a one-line error when they cannot go together."""
    A = as_activations(A)
    x = np.asarray(x)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    N = A.shape[0]
    if x.ndim != A.ndim or x.shape[0] != N:
        raise OnnxcamError(f"Score-CAM needs the input and the node to have the same spatial rank and batch; "
                           f"input {x.shape}, node {A.shape} — pick a node with the input's layout")
    if targets.shape != (N,):
        raise ValueError(f"targets shape {targets.shape} does not match the batch of {N}")
    if batch_size < 1 or (max_channels is not None and max_channels < 1):
        raise OnnxcamError("Score-CAM batch size and max channels must be at least 1")
    return A, x, targets


class _BatchScorer:
    """Collects masked inputs and runs the model whenever ``batch_size`` of them are waiting."""

    def __init__(self, forward_logits, batch_size, total, progress):
        self.forward_logits, self.batch_size = forward_logits, batch_size
        self.total, self.progress, self.done = total, progress, 0
        self.inputs, self.keys, self.targets = [], [], []
        self.scores: dict[tuple, float] = {}

    def add(self, key, masked_input, target):
        self.inputs.append(masked_input)
        self.keys.append(key)
        self.targets.append(target)
        if len(self.inputs) == self.batch_size:
            self.flush()

    def flush(self):
        if not self.inputs:
            return
        logits = np.asarray(self.forward_logits(np.stack(self.inputs)))
        if logits.ndim != 2 or logits.shape[0] != len(self.inputs):
            raise ValueError(f"forward_logits returned shape {logits.shape} for a batch of {len(self.inputs)}")
        picked = logits[np.arange(len(self.inputs)), np.asarray(self.targets)]
        self.scores.update(zip(self.keys, picked.astype(np.float64)))
        self.done += len(self.inputs)
        self.inputs, self.keys, self.targets = [], [], []
        if self.progress is not None:
            self.progress(self.done, self.total)


def scorecam_weights(A, x, targets, forward_logits: Callable[[np.ndarray], np.ndarray],
                     batch_size: int = 32, max_channels: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Channel weights (N, C) float32 for activations A (N, C, *S) of inputs x (N, Cin, *Sin).

    ``forward_logits`` maps a channels-first batch (B, Cin, *Sin) to logits (B, K); ``targets`` holds
    each sample's class index. At most ``batch_size`` masked inputs exist at any time.
    """
    A, x, targets = checked_inputs(A, x, targets, batch_size, max_channels)
    N, C = A.shape[:2]
    size = x.shape[2:]
    kept = [kept_channels(a, max_channels) for a in A]
    constant = [np.ptp(a.reshape(C, -1), axis=1) == 0 for a in A]
    total = sum(int((~constant[n][kept[n]]).sum()) + int(constant[n][kept[n]].any()) for n in range(N))
    scorer = _BatchScorer(forward_logits, batch_size, total, progress)

    for n in range(N):
        varying = kept[n][~constant[n][kept[n]]]
        if constant[n][kept[n]].any():
            zero_input = (x[n] * np.zeros(size, dtype=np.float32)).astype(x.dtype, copy=False)
            scorer.add((n, "zero"), zero_input, targets[n])
        for start in range(0, len(varying), batch_size):
            chunk = varying[start:start + batch_size]
            for k, mask in zip(chunk, channel_masks(A[n, chunk], size)):
                scorer.add((n, int(k)), (x[n] * mask).astype(x.dtype, copy=False), targets[n])
    scorer.flush()

    weights = np.zeros((N, C), dtype=np.float32)
    for n in range(N):
        scores = np.array([scorer.scores[(n, "zero") if constant[n][k] else (n, int(k))] for k in kept[n]])
        weights[n, kept[n]] = softmax(scores)
    return weights
