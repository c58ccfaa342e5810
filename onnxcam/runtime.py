"""ONNX Runtime sessions: import with a clear error, pick the provider (CUDA when present, else CPU),
run with IO binding on CUDA so inputs are copied once and outputs come back once.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from .errors import OnnxcamError

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


def session_options(threads: int | None = None):
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("ONNXCAM_THREADS", "0") or 0)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class Runner:
    """One inference session plus the output names it returns, reused across batches."""

    def __init__(self, model: onnx.ModelProto | bytes, output_names: list[str], provider: str = "auto",
                 threads: int | None = None):
        ort = import_onnxruntime()
        data = model if isinstance(model, bytes) else model.SerializeToString()
        providers = execution_providers(provider)
        try:
            self.session = ort.InferenceSession(data, sess_options=session_options(threads),
                                                providers=providers)
        except Exception as exc:
            raise OnnxcamError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc
        self.output_names = list(output_names)
        # float16 (or double) models: float32 feeds are cast at the boundary, outputs come back float32
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"

    @property
    def device(self) -> str:
        return "cuda" if self.on_cuda else "cpu"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
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
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
            raise OnnxcamError(f"the model cannot run on inputs {shapes}: {first_line(exc)}; "
                               "check the input size (--size) and layout (--layout)") from exc

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _as_type(value: np.ndarray, dtype) -> np.ndarray:
    if dtype is None or not isinstance(value, np.ndarray) or value.dtype == dtype or value.dtype.kind != "f":
        return value
    return value.astype(dtype)


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
