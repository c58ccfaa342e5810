"""onnxcam: class activation maps (Grad-CAM, Score-CAM, LayerCAM, ...) for any ONNX model."""
from .errors import OnnxcamError
from .explainer import Explainer, Explanation, explain
from .methods import METHODS

__all__ = ["Explainer", "Explanation", "explain", "METHODS", "OnnxcamError"]
__version__ = "0.1.0"
