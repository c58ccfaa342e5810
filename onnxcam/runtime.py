"""ONNX Runtime sessions: import with a clear error, pick the provider (CUDA when present, else CPU),
run with IO binding on CUDA so inputs are copied once and outputs come back once; and the one probe
run on zeros that measures layer shapes shape inference could not tell.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import OnnxcamError, shape_text
from .profile import phase

PROVIDERS = ("auto", "cpu", "cuda")
_MISSING_RUNTIME = ("ONNX Runtime is not installed; install one of the extras: "
                    "pip install 'onnxcam[cpu]' (or [gpu], [training-cpu], [training])")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxcamError(_MISSING_RUNTIME) from exc
    return onnxruntime


def execution_providers(provider: str = "auto") -> list[str]:
    """Provider list for a session: ``auto`` takes CUDA when this ONNX Runtime build and machine have it."""
    if provider not in PROVIDERS:
        raise OnnxcamError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    available = import_onnxruntime().get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cuda":
        raise OnnxcamError("--provider cuda needs onnxruntime-gpu and a CUDA GPU; this ONNX Runtime offers "
                           f"{', '.join(available)}; install onnxcam[gpu] or use --provider cpu")
    return ["CPUExecutionProvider"]


def configured_threads(threads: int | None = None) -> int | None:
    """The CPU threads asked for: ``threads``, else $ONNXCAM_THREADS, else None (the machine's)."""
    return threads or int(os.environ.get("ONNXCAM_THREADS", "0") or 0) or None


def session_options(threads: int | None = None):
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = configured_threads(threads)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class Runner:
    """One inference session plus the output names it returns, reused across batches."""

    def __init__(self, model: onnx.ModelProto | bytes, output_names: list[str] | None, provider: str = "auto",
                 threads: int | None = None):
        ort = import_onnxruntime()
        data = model if isinstance(model, bytes) else model.SerializeToString()
        providers = execution_providers(provider)
        try:
            with phase("session"):
                self.session = ort.InferenceSession(data, sess_options=session_options(threads),
                                                    providers=providers)
        except Exception as exc:
            raise OnnxcamError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc
        # None: every output, in the model's order
        self.output_names = ([o.name for o in self.session.get_outputs()] if output_names is None
                             else list(output_names))
        # float16 (or double) models: float32 feeds are cast at the boundary, outputs come back float32
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"

    def on_device(self, array: np.ndarray):
        """``array`` as a feed that stays on the session's device across runs (an OrtValue on CUDA,
        the array itself on CPU): bind it once, reuse it for many ``run`` calls."""
        if not self.on_cuda:
            return array
        return import_onnxruntime().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)

    def run(self, feeds: dict) -> list[np.ndarray]:
        """The output arrays for ``feeds`` (NumPy arrays, or values from ``on_device``); float feeds are
        cast to the input's float type, float outputs come back as float32."""
        feeds = {k: _as_type(v, self.input_types.get(k)) for k, v in feeds.items()}
        try:
            if self.on_cuda:
                outputs = self._run_bound(feeds)
            else:
                outputs = self.session.run(self.output_names, feeds)
            return [o.astype(np.float32) if isinstance(o, np.ndarray) and o.dtype.kind == "f"
                    and o.dtype != np.float32 else o for o in outputs]
        except OnnxcamError:
            raise
        except Exception as exc:
            shapes = ", ".join(f"{k} {_shape_of(v)}" for k, v in feeds.items())
            raise OnnxcamError(f"the model cannot run on inputs {shapes}: {first_line(exc)}; "
                               "check the input size (--size) and layout (--layout)") from exc

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def probe_shapes(model: onnx.ModelProto, tensors: list[str],
                 probe_input_shapes: dict[str, tuple] | None, feeds: dict | None = None) -> dict[str, tuple]:
    """Run the model once with ``tensors`` exposed as outputs and read their real (element type, shape):
    on ``feeds`` when given, else on zeros of ``probe_input_shapes``."""
    ort = import_onnxruntime()
    feeds = feeds if feeds is not None else _zero_feeds(model, probe_input_shapes or {})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {output.name for output in probe.graph.output}
    for tensor in tensors:
        if tensor not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        values = session.run(tensors, feeds)
    except Exception as error:
        message = " ".join(str(error).split())
        if len(message) > 400:  # ORT puts source paths in the middle and the reason at the end
            message = f"{message[:120]} ... {message[-260:]}"
        raise OnnxcamError(f"could not run the model on zeros to measure layer shapes: {message}; "
                           "check the input size given (--size, or Explainer(input_shape=...))") from None
    result = {}
    for tensor, value in zip(tensors, values):
        value = np.asarray(value)
        elem_type = helper.np_dtype_to_tensor_dtype(value.dtype) if value.dtype.kind in "fiub" else None
        result[tensor] = (elem_type, tuple(int(dim) for dim in value.shape))
    return result


def _zero_feeds(model: onnx.ModelProto, given: dict[str, tuple]) -> dict[str, np.ndarray]:
    initializers = {init.name for init in model.graph.initializer}
    feeds = {}
    for value_info in model.graph.input:
        if value_info.name in initializers:
            continue
        tensor_type = value_info.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type or TensorProto.FLOAT)
        shape = given.get(value_info.name)
        if shape is None:
            shape = _static_input_shape(value_info)
        feeds[value_info.name] = np.zeros(tuple(int(dim) for dim in shape), dtype=dtype)
    return feeds


def _static_input_shape(value_info: onnx.ValueInfoProto) -> tuple:
    """Batch 1 and the static dims; a symbolic dim past the batch axis has no safe default."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise OnnxcamError(f"input {value_info.name!r} has no declared shape, so layer shapes need one run "
                           f"at a size you choose; give it, e.g. probe_input_shapes="
                           f"{{{value_info.name!r}: (1, 3, 224, 224)}} (CLI: --size 224,224)")
    dims = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else (dim.dim_param or "?")
            for dim in tensor_type.shape.dim]
    if dims and not isinstance(dims[0], int):
        dims[0] = 1
    symbolic = [dim for dim in dims if not isinstance(dim, int)]
    if symbolic:
        example = tuple(dim if isinstance(dim, int) else 224 for dim in dims)
        raise OnnxcamError(f"input {value_info.name!r} has symbolic axes {', '.join(map(str, symbolic))} "
                           f"(shape {shape_text(tuple(dims))}), so layer shapes need one run at a size you "
                           f"choose; give it, e.g. probe_input_shapes={{{value_info.name!r}: {example}}} "
                           f"(CLI: --size HEIGHT,WIDTH; Python: Explainer(..., input_shape={example}))")
    return tuple(dims)


def _shape_of(value) -> tuple:
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _as_type(value: np.ndarray, dtype) -> np.ndarray:
    if dtype is None or not isinstance(value, np.ndarray) or value.dtype == dtype or value.dtype.kind != "f":
        return value
    return value.astype(dtype)


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
