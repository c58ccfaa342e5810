"""Score-CAM in one place: which scorer runs, the one rank check, and the in-graph masking model.

``ScoreCam.weights`` gives the channel weights. Where it can, it builds the masks inside the ONNX graph:
one model takes a sample ``onnxcam_x`` (batch 1, the model's layout) and a chunk of channel maps
``onnxcam_maps`` (B, *s) and, in the graph, upsamples each map to the input's spatial size (linear,
corners aligned: for 2D maps two MatMuls with the interpolation matrices ``onnxcam_rows`` (H, h) and
``onnxcam_columns`` (w, W) the scorer feeds, several times faster than Resize; else Resize), normalises
it to ``(M - min) / (max - min + 1e-8)``, multiplies the input by it and runs the original graph on the
B masked inputs, returning the logits (B, K). Only the small maps go in and the logits come out, so on CUDA the masked batch never crosses to the host; memory is bounded by
B. Exactly repeated channel maps give the same masked input, so each distinct map is scored once.

Where the graph cannot do it (opset < 11, or a map output whose target is a plane of positions), the
NumPy reference ``methods.scorecam.scorecam_weights`` builds the masks and the model's forward pass
scores them. Both follow the same semantics: constant channels share one all-zero mask, Faster
Score-CAM keeps ``max_channels``, the weights are a softmax of the scores.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import layouts
from .errors import OnnxcamError
from .graph import GraphBuilder, copy_model
from .methods.interpolation import interpolation_matrix
from .methods.scorecam import MASK_EPS, checked_inputs, kept_channels, scorecam_weights, softmax
from .model import LoadedModel
from .runtime import Runner
from .surgery import find_logits, set_outputs

SAMPLE = "onnxcam_x"
MAPS = "onnxcam_maps"
ROWS, COLUMNS = "onnxcam_rows", "onnxcam_columns"   # 2D: the upsampling as two MatMuls (see below)
_P = "onnxcam_scorecam/"


def _input_dims(spec) -> list:
    return [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else None)
            for d in spec.shape]


def check_spatial_rank(node_name: str, node_rank: int | None, input_rank: int | None) -> None:
    """The one Score-CAM shape check: masks are channel maps upsampled to the input, so the node must
    have as many spatial axes as the input, and the input must have spatial axes at all."""
    if input_rank is not None and input_rank < 3:
        raise OnnxcamError(f"Score-CAM needs an input with spatial axes; the model's input has rank {input_rank}")
    if node_rank is not None and input_rank is not None and node_rank != input_rank:
        raise OnnxcamError(f"Score-CAM needs the node's spatial axes to match the input's; node {node_name} "
                           f"has {node_rank - 2} spatial axes, the input {input_rank - 2}")


def build_scorecam_model(model: LoadedModel, input_layout: str, probabilities: bool = False,
                         output: str | None = None) -> onnx.ModelProto:
    """The masking + scoring model described in the module docstring (inputs SAMPLE, MAPS; output: logits)."""
    view = model.view
    if view.opset < 11:
        raise OnnxcamError(f"in-graph Score-CAM needs opset 11 or later (Resize with aligned corners); the "
                           f"model uses opset {view.opset}: convert it with onnx.version_converter")
    spec = model.input
    rank = spec.rank
    check_spatial_rank(spec.name, None, rank)
    proto = copy_model(model.proto)
    graph = proto.graph
    logits = find_logits(view, probabilities, output)
    channels_first = input_layout == layouts.FIRST
    spatial_axes = list(range(2, rank)) if channels_first else list(range(1, rank - 1))

    b = GraphBuilder(view.names(), _P, view.opset)
    dims = _input_dims(spec)
    kept_inputs = [vi for vi in graph.input if vi.name != spec.name]
    del graph.input[:]
    separable = rank == 4
    graph.input.extend([
        helper.make_tensor_value_info(b.reserve(SAMPLE), spec.elem_type, [1] + dims[1:]),
        helper.make_tensor_value_info(b.reserve(MAPS), TensorProto.FLOAT,
                                      ["chunk"] + [f"map_d{i}" for i in range(1, rank - 1)]),
        *([helper.make_tensor_value_info(b.reserve(ROWS), TensorProto.FLOAT, ["in_h", "map_d1"]),
           helper.make_tensor_value_info(b.reserve(COLUMNS), TensorProto.FLOAT, ["map_d2", "in_w"])]
          if separable else []),
        *kept_inputs,
    ])
    # A value_info for the old input name would pin the masked batch to the model's declared batch.
    kept_infos = [vi for vi in graph.value_info if vi.name != spec.name]
    del graph.value_info[:]
    graph.value_info.extend(kept_infos)

    one = b.ints([1], "one")
    spatial = b.op("Slice", [b.op("Shape", [SAMPLE]), b.ints([spatial_axes[0]], "sp_start"),
                             b.ints([spatial_axes[-1] + 1], "sp_end")])
    maps_shape = b.op("Shape", [MAPS])
    chunk = b.op("Slice", [maps_shape, b.ints([0], "zero"), one])
    map_spatial = b.op("Slice", [maps_shape, one, b.ints([np.iinfo(np.int64).max], "end")])
    if separable:                                    # (B, h, w) -> (B, H, W) -> (B, 1, H, W)
        up = b.axes_op("Unsqueeze", b.op("MatMul", [ROWS, b.op("MatMul", [MAPS, COLUMNS])]), [1])
    else:
        maps_1 = b.op("Reshape", [MAPS, b.op("Concat", [chunk, one, map_spatial], axis=0)])   # (B, 1, *s)
        sizes = b.op("Concat", [chunk, one, spatial], axis=0)
        if view.opset >= 13:
            resize_inputs = [maps_1, "", "", sizes]
        else:
            empty = b.initializer(np.zeros(0, dtype=np.float32), "empty")
            resize_inputs = [maps_1, empty, empty, sizes]
        up = b.op("Resize", resize_inputs, mode="linear", coordinate_transformation_mode="align_corners")
    map_axes = list(range(2, rank))                                                            # (B, 1, *S)
    low = b.axes_op("ReduceMin", up, map_axes, keepdims=1)
    high = b.axes_op("ReduceMax", up, map_axes, keepdims=1)
    value_range = b.op("Add", [b.op("Sub", [high, low]),
                               b.initializer(np.array(MASK_EPS, dtype=np.float32), "eps")])
    masks = b.op("Div", [b.op("Sub", [up, low]), value_range])
    if not channels_first:  # (B, 1, *S) -> (B, *S, 1): broadcast over the trailing channel axis
        masks = b.op("Reshape", [masks, b.op("Concat", [chunk, spatial, one], axis=0)])
    if spec.elem_type != TensorProto.FLOAT:
        masks = b.op("Cast", [masks], to=spec.elem_type)
    # The masked batch takes the original input's name, so the original graph runs on it unchanged.
    b.op("Mul", [SAMPLE, masks], outputs=[spec.name])
    b.apply_to(proto, prologue=True)   # topological order: the masking prologue first
    set_outputs(proto, [logits], view)
    return proto


def distinct_maps(A_sample: np.ndarray, max_channels: int | None):
    """What one sample needs scored: ``(maps, slot)`` where ``maps`` (M, *s) holds each distinct map once
    (an all-zero map standing for every constant channel) and ``slot`` (C,) gives, for each channel, the
    row of ``maps`` whose score it takes, or -1 for channels Faster Score-CAM leaves out."""
    C = A_sample.shape[0]
    flat = np.ascontiguousarray(A_sample.reshape(C, -1))
    slot = np.full(C, -1, dtype=np.int64)
    rows: list[np.ndarray] = []
    seen: dict[bytes, int] = {}
    constant = np.ptp(flat, axis=1) == 0 if flat.shape[1] else np.ones(C, dtype=bool)
    for k in kept_channels(A_sample, max_channels):
        row = np.zeros_like(flat[k]) if constant[k] else flat[k]
        key = b"zero" if constant[k] else row.tobytes()
        if key not in seen:
            seen[key] = len(rows)
            rows.append(row)
        slot[k] = seen[key]
    maps = np.stack(rows).reshape((len(rows),) + A_sample.shape[1:]) if rows else \
        np.zeros((0,) + A_sample.shape[1:], np.float32)
    return maps.astype(np.float32, copy=False), slot


class InGraphScorer:
    """Score-CAM channel weights from one session that masks and scores inside the graph."""

    def __init__(self, model: LoadedModel, input_layout: str, provider: str = "auto",
                 threads: int | None = None, probabilities: bool = False,
                 proto: onnx.ModelProto | None = None, output: str | None = None):
        self.model = model
        self.proto = proto if proto is not None else build_scorecam_model(model, input_layout, probabilities,
                                                                          output)
        self.logits_name = self.proto.graph.output[0].name
        self.runner = Runner(self.proto, [self.logits_name], provider, threads)
        batch = model.input.shape[0] if model.input.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.masks_scored = 0   # distinct masked inputs run so far (the bench's floor counts these)
        self.separable = ROWS in {i.name for i in self.proto.graph.input}
        self.input_layout = input_layout
        self._matrices: dict[tuple, tuple] = {}

    def weights(self, A, x, targets, batch_size: int = 32, max_channels: int | None = None,
                progress: Callable[[int, int], None] | None = None,
                other_feeds: Callable[[int], dict] | None = None) -> np.ndarray:
        """Channel weights (N, C) float32 for activations A (N, C, *s, channels-first) of inputs x
        (N, ..., in the model's own layout); ``targets`` (N,) the class scored per sample;
        ``other_feeds(B)``: the model's other inputs for B masked copies."""
        A, x, targets = checked_inputs(A, x, targets, batch_size, max_channels)
        N, C = A.shape[:2]
        chunk = self.fixed_batch or batch_size
        plans = [distinct_maps(A[n], max_channels) for n in range(N)]
        total, done = sum(len(maps) for maps, _ in plans), 0
        weights = np.zeros((N, C), dtype=np.float32)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.model.input.elem_type)
        resize = self._resize_feeds(A.shape[2:], layouts.spatial_shape(x.shape, self.input_layout))
        for n, (maps, slot) in enumerate(plans):
            sample = self.runner.on_device(np.ascontiguousarray(x[n:n + 1], dtype=dtype))
            scores = np.empty(len(maps), dtype=np.float64)
            for lo in range(0, len(maps), chunk):
                part = maps[lo:lo + chunk]
                feeds = {SAMPLE: sample, MAPS: self._padded(part, chunk), **resize}
                if other_feeds is not None:
                    feeds.update(other_feeds(len(feeds[MAPS]), n))
                logits = self.runner.run(feeds)[0][:len(part)]
                if logits.ndim != 2:
                    raise OnnxcamError(f"Score-CAM needs (batch, classes) logits; the model gives "
                                       f"shape {logits.shape}")
                scores[lo:lo + len(part)] = logits[:, targets[n]]
                done += len(part)
                self.masks_scored += len(part)
                if progress is not None:
                    progress(done, total)
            kept = slot >= 0
            weights[n, kept] = softmax(scores[slot[kept]])
        return weights

    def _resize_feeds(self, map_size: tuple, input_size: tuple) -> dict:
        """The corner-aligned interpolation matrices for maps of ``map_size`` (2D models), kept on the
        session's device once per pair of sizes."""
        if not self.separable:
            return {}
        key = (tuple(map_size), tuple(input_size))
        if key not in self._matrices:
            rows = interpolation_matrix(map_size[0], input_size[0], align_corners=True)
            columns = np.ascontiguousarray(interpolation_matrix(map_size[1], input_size[1], align_corners=True).T)
            self._matrices[key] = {ROWS: self.runner.on_device(rows), COLUMNS: self.runner.on_device(columns)}
        return self._matrices[key]

    def _padded(self, part: np.ndarray, chunk: int) -> np.ndarray:
        """A model with a fixed batch takes exactly that many maps: pad with zero maps."""
        if self.fixed_batch is None or len(part) == chunk:
            return np.ascontiguousarray(part)
        pad = np.zeros((chunk - len(part),) + part.shape[1:], dtype=part.dtype)
        return np.concatenate([part, pad])


class ScoreCam:
    """Score-CAM weights for one model: the in-graph scorer where the model allows it, else NumPy masks
    scored by ``forward(batch, sample)`` (masked copies of input ``sample``, in the model's layout ->
    the scored output, canonical). ``other_feeds(count, sample)``: the model's other inputs for
    ``count`` masked copies of input ``sample``."""

    def __init__(self, model: LoadedModel, input_layout: str, forward: Callable[[np.ndarray, int], np.ndarray],
                 provider: str = "auto", threads: int | None = None, probabilities: bool = False,
                 other_feeds: Callable[[int, int], dict] | None = None, output: str | None = None):
        self.model = model
        self.other_feeds = other_feeds
        self.input_layout = input_layout
        self.forward = forward
        self._options = (provider, threads, probabilities, output)
        self._in_graph: InGraphScorer | None = None
        self._in_graph_impossible = False

    def check(self, node_name: str, node_rank: int | None) -> None:
        check_spatial_rank(node_name, node_rank, self.model.input.rank)

    def in_graph_scorer(self) -> InGraphScorer | None:
        """The in-graph scorer, built on first use, or None where the model's opset is too old for it."""
        if self._in_graph is None and not self._in_graph_impossible:
            provider, threads, probabilities, output = self._options
            try:
                self._in_graph = InGraphScorer(self.model, self.input_layout, provider, threads, probabilities,
                                               output=output)
            except OnnxcamError:
                self._in_graph_impossible = True
        return self._in_graph

    def weights(self, node_name: str, A: np.ndarray, x: np.ndarray, targets: np.ndarray,
                planes: np.ndarray | None = None, batch_size: int | None = None,
                max_channels: int | None = None, progress=None) -> np.ndarray:
        """Channel weights (N, C) for channels-first activations ``A`` of the batch ``x`` (model layout).

        ``planes`` (N, K, *P) for map outputs: each sample scores its target class summed over its own
        plane of positions (the in-graph scorer reads (N, K) logits only, so these take the NumPy path)."""
        self.check(node_name, A.ndim)
        options = dict(batch_size=batch_size or 32, max_channels=max_channels, progress=progress)
        scorer = self.in_graph_scorer() if planes is None else None
        if scorer is not None:
            return scorer.weights(A, x, targets, other_feeds=self.other_feeds, **options)
        x_first = layouts.to_channels_first(x, self.input_layout)
        return np.concatenate([   # one sample at a time: its masked copies share its other inputs
            scorecam_weights(A[i:i + 1], x_first[i:i + 1], targets[i:i + 1],
                             self._forward_logits(i, None if planes is None else planes[i, targets[i]]), **options)
            for i in range(len(x))])

    def _forward_logits(self, sample: int, plane: np.ndarray | None):
        """forward_logits for the NumPy path: channels-first masked copies of ``sample`` -> (B, K)."""
        def forward_logits(batch: np.ndarray) -> np.ndarray:
            logits = self.forward(layouts.to_layout(batch.astype(np.float32), self.input_layout), sample)
            if plane is None:
                return logits
            return (logits * plane).reshape(logits.shape[0], logits.shape[1], -1).sum(-1)
        return forward_logits
