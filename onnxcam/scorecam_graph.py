"""Score-CAM at the cost of its forward passes: the masks are built inside the ONNX graph.

One model takes a sample ``onnxcam_x`` (batch 1, the model's layout) and a chunk of channel maps
``onnxcam_maps`` (B, *s) and, in the graph, upsamples each map to the input's spatial size (Resize,
linear, corners aligned), normalises it to ``(M - min) / (max - min + 1e-8)``, multiplies the input by it
and runs the original graph on the B masked inputs, returning the logits (B, K). Only the small maps go
in and the logits come out, so on CUDA the masked batch never crosses to the host; memory is bounded by
B. The semantics are those of ``methods.scorecam.scorecam_weights`` (see there): constant channels share
one all-zero mask, Faster Score-CAM keeps ``max_channels``, the weights are a softmax of the scores.
Exactly repeated channel maps give the same masked input, so each distinct map is scored once.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import layouts
from .errors import OnnxcamError
from .methods.scorecam import MASK_EPS, checked_inputs, kept_channels, softmax
from .model import LoadedModel, default_opset
from .opsets import axes_node
from .runtime import Runner, import_onnxruntime
from .surgery import copy_model, find_logits, set_outputs

SAMPLE = "onnxcam_x"
MAPS = "onnxcam_maps"
_P = "onnxcam_scorecam/"


def _const(graph: onnx.GraphProto, name: str, value) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), _P + name))
    return _P + name


def _reduce(graph, opset: int, op: str, data: str, out: str, axes: list[int]) -> onnx.NodeProto:
    """ReduceMin/ReduceMax with keepdims."""
    return axes_node(op, data, out, axes, opset,
                     lambda value: _const(graph, out.removeprefix(_P) + "_axes", value), keepdims=1)


def _input_dims(spec) -> list:
    return [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else None)
            for d in spec.shape]


def build_scorecam_model(model: LoadedModel, input_layout: str, probabilities: bool = False) -> onnx.ModelProto:
    """The masking + scoring model described in the module docstring (inputs SAMPLE, MAPS; output: logits)."""
    opset = default_opset(model.proto)
    if opset < 11:
        raise OnnxcamError(f"in-graph Score-CAM needs opset 11 or later (Resize with aligned corners); the "
                           f"model uses opset {opset}: convert it with onnx.version_converter")
    spec = model.input
    rank = spec.rank
    if rank is None or rank < 3:
        raise OnnxcamError(f"Score-CAM needs an input with spatial axes; input {spec.name!r} has shape "
                           f"{spec.shape}")
    proto = copy_model(model.proto)
    graph = proto.graph
    logits = find_logits(proto, probabilities)
    channels_first = input_layout == layouts.FIRST
    spatial_axes = list(range(2, rank)) if channels_first else list(range(1, rank - 1))

    dims = _input_dims(spec)
    sample_dims = [1] + dims[1:]
    kept_inputs = [vi for vi in graph.input if vi.name != spec.name]
    del graph.input[:]
    graph.input.extend([
        helper.make_tensor_value_info(SAMPLE, spec.elem_type, sample_dims),
        helper.make_tensor_value_info(MAPS, TensorProto.FLOAT, ["chunk"] + [f"map_d{i}" for i in
                                                                          range(1, rank - 1)]),
        *kept_inputs,
    ])
    # A value_info for the old input name would pin the masked batch to the model's declared batch.
    kept_infos = [vi for vi in graph.value_info if vi.name != spec.name]
    del graph.value_info[:]
    graph.value_info.extend(kept_infos)

    nodes = [
        helper.make_node("Shape", [SAMPLE], [_P + "x_shape"]),
        helper.make_node("Slice", [_P + "x_shape", _const(graph, "sp_start", np.array([spatial_axes[0]])),
                                   _const(graph, "sp_end", np.array([spatial_axes[-1] + 1]))],
                         [_P + "spatial"]),
        helper.make_node("Shape", [MAPS], [_P + "maps_shape"]),
        helper.make_node("Slice", [_P + "maps_shape", _const(graph, "zero", np.array([0])),
                                   _const(graph, "one", np.array([1]))], [_P + "chunk"]),
        helper.make_node("Slice", [_P + "maps_shape", _P + "one",
                                   _const(graph, "end", np.array([np.iinfo(np.int64).max]))],
                         [_P + "map_spatial"]),
        helper.make_node("Concat", [_P + "chunk", _P + "one", _P + "map_spatial"], [_P + "maps_1_shape"],
                         axis=0),
        helper.make_node("Reshape", [MAPS, _P + "maps_1_shape"], [_P + "maps_1"]),       # (B, 1, *s)
        helper.make_node("Concat", [_P + "chunk", _P + "one", _P + "spatial"], [_P + "sizes"], axis=0),
    ]
    if opset >= 13:
        resize_inputs = [_P + "maps_1", "", "", _P + "sizes"]
    else:
        empty = _const(graph, "empty", np.zeros(0, dtype=np.float32))
        resize_inputs = [_P + "maps_1", empty, empty, _P + "sizes"]
    nodes.append(helper.make_node("Resize", resize_inputs, [_P + "up"], mode="linear",
                                  coordinate_transformation_mode="align_corners"))  # (B, 1, *S)
    map_axes = list(range(2, rank))
    eps = _const(graph, "eps", np.array(MASK_EPS, dtype=np.float32))
    nodes += [
        _reduce(graph, opset, "ReduceMin", _P + "up", _P + "low", map_axes),
        _reduce(graph, opset, "ReduceMax", _P + "up", _P + "high", map_axes),
        helper.make_node("Sub", [_P + "up", _P + "low"], [_P + "shifted"]),
        helper.make_node("Sub", [_P + "high", _P + "low"], [_P + "range"]),
        helper.make_node("Add", [_P + "range", eps], [_P + "range_eps"]),
        helper.make_node("Div", [_P + "shifted", _P + "range_eps"], [_P + "masks"]),
    ]
    masks = _P + "masks"
    if not channels_first:  # (B, 1, *S) -> (B, *S, 1): broadcast over the trailing channel axis
        nodes += [helper.make_node("Concat", [_P + "chunk", _P + "spatial", _P + "one"],
                                   [_P + "last_shape"], axis=0),
                  helper.make_node("Reshape", [masks, _P + "last_shape"], [_P + "masks_last"])]
        masks = _P + "masks_last"
    if spec.elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [masks], [_P + "masks_cast"], to=spec.elem_type))
        masks = _P + "masks_cast"
    # The masked batch takes the original input's name, so the original graph runs on it unchanged.
    nodes.append(helper.make_node("Mul", [SAMPLE, masks], [spec.name]))
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + original)   # topological order: the masking prologue first
    set_outputs(proto, [logits])
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


class ScoreCamScorer:
    """Score-CAM channel weights from one session that masks and scores inside the graph."""

    def __init__(self, model: LoadedModel, input_layout: str, provider: str = "auto",
                 threads: int | None = None, probabilities: bool = False,
                 proto: onnx.ModelProto | None = None):
        self.model = model
        self.input_layout = input_layout
        self.proto = proto if proto is not None else build_scorecam_model(model, input_layout, probabilities)
        self.logits_name = self.proto.graph.output[0].name
        self.runner = Runner(self.proto, [self.logits_name], provider, threads)
        batch = model.input.shape[0] if model.input.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.masks_scored = 0   # distinct masked inputs run through the model so far

    def weights(self, A, x, targets, batch_size: int = 32, max_channels: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Channel weights (N, C) float32 for activations A (N, C, *s, channels-first) of inputs x
        (N, ..., in the model's own layout); ``targets`` (N,) the class scored per sample."""
        A, x, targets = checked_inputs(A, x, targets, batch_size, max_channels)
        N, C = A.shape[:2]
        chunk = self.fixed_batch or batch_size
        plans = [distinct_maps(A[n], max_channels) for n in range(N)]
        total, done = sum(len(maps) for maps, _ in plans), 0
        weights = np.zeros((N, C), dtype=np.float32)
        for n, (maps, slot) in enumerate(plans):
            sample = self._bind_sample(np.ascontiguousarray(x[n:n + 1], dtype=self._input_dtype()))
            scores = np.empty(len(maps), dtype=np.float64)
            for lo in range(0, len(maps), chunk):
                part = maps[lo:lo + chunk]
                logits = self._run(sample, self._padded(part, chunk))[:len(part)]
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

    # ---- running ------------------------------------------------------------------------------
    def _input_dtype(self):
        return onnx.helper.tensor_dtype_to_np_dtype(self.model.input.elem_type)

    def _padded(self, part: np.ndarray, chunk: int) -> np.ndarray:
        """A model with a fixed batch takes exactly that many maps: pad with zero maps."""
        if self.fixed_batch is None or len(part) == chunk:
            return np.ascontiguousarray(part)
        pad = np.zeros((chunk - len(part),) + part.shape[1:], dtype=part.dtype)
        return np.concatenate([part, pad])

    def _bind_sample(self, sample: np.ndarray):
        """On CUDA the sample is copied to the device once and reused by every chunk."""
        if not self.runner.on_cuda:
            return sample
        ort = import_onnxruntime()
        return ort.OrtValue.ortvalue_from_numpy(sample, "cuda", 0)

    def _run(self, sample, maps: np.ndarray) -> np.ndarray:
        if not self.runner.on_cuda:
            return self.runner.run({SAMPLE: sample, MAPS: maps})[0]
        binding = self.runner.session.io_binding()
        binding.bind_ortvalue_input(SAMPLE, sample)
        binding.bind_cpu_input(MAPS, maps)
        binding.bind_output(self.logits_name, "cpu")
        self.runner.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
