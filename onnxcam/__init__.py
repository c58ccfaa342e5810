"""onnxcam: class activation maps (Grad-CAM, Score-CAM, LayerCAM, ...) for any ONNX model."""
import time as _time

IMPORT_START = _time.perf_counter()     # `onnxcam explain --profile` counts imports from here
from .errors import OnnxcamError
from .explainer import Explainer, Explanation, explain
from .methods import METHODS

__all__ = ["Explainer", "Explanation", "explain", "METHODS", "OnnxcamError"]
__version__ = "0.1.0"
