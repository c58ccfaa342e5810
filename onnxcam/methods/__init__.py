"""The NumPy CAM engine: one pure function per method, a registry describing what each needs, and the
post-processing shared by all. Arrays are channels-first, (N, C, *S) with 1 to 3 spatial axes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import OnnxcamError
from ._arrays import weighted_sum
from .eigencam import eigencam
from .gradient_based import cam, gradcam, gradcam_plus_plus, hirescam, layercam, xgradcam
from .legrad import legrad
from .postprocess import fuse_layers, layer_to_input, normalize, resize
from .scorecam import channel_masks, scorecam_weights


# What a method may need besides the activations A (N, C, *S) of the node, each named after the
# LayerInputs field that carries it. The Explainer has one provider per need.
GRADIENTS = "gradients"            # d score / d A, same shape as A
CLASS_WEIGHTS = "class_weights"    # (N, C): the classifier row of each sample's target (CAM)
CHANNEL_SCORES = "channel_scores"  # (N, C): Score-CAM's softmax of the masked inputs' scores
ATTENTION_GRADIENTS = "attention_gradients"  # (N, heads, T, T): d block score / d attention (LeGrad)
NEEDS = (GRADIENTS, CLASS_WEIGHTS, CHANNEL_SCORES, ATTENTION_GRADIENTS)


@dataclass(frozen=True)
class LayerInputs:
    """Everything a method can be given for one node and one batch; only what it needs is filled in."""
    activations: np.ndarray
    gradients: np.ndarray | None = None
    class_weights: np.ndarray | None = None
    channel_scores: np.ndarray | None = None
    attention_gradients: np.ndarray | None = None
    threads: int | None = None         # host threads a ``threaded`` method may use (None: every CPU)


@dataclass(frozen=True)
class Method:
    """A CAM method: the pure function giving its map at layer resolution, and what it needs.

    ``function(A, *inputs)`` takes the activations, then one array per entry of ``needs`` in order."""
    name: str
    function: Callable
    needs: tuple[str, ...]
    description: str
    paper: str
    needs_target: bool = True
    fuse_raw: bool = False      # several nodes: average their raw maps, then normalise once (LeGrad)
    threaded: bool = False      # spreads per-sample host work over ``threads=`` (EigenCAM's SVDs)

    def layer_map(self, inputs: LayerInputs) -> np.ndarray:
        extra = {"threads": inputs.threads} if self.threaded else {}
        return self.function(inputs.activations, *(getattr(inputs, need) for need in self.needs), **extra)


def _method(name, function, needs, description, paper, target=True, fuse_raw=False, threaded=False) -> Method:
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"method {name} needs unknown inputs {sorted(unknown)}")
    return Method(name, function, tuple(needs), description, paper, target, fuse_raw, threaded)


METHODS: dict[str, Method] = {m.name: m for m in (
    _method("cam", cam, [CLASS_WEIGHTS], "weights = the classifier's row for the target, after global average pooling",
            "Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016 "
            "(arXiv:1512.04150)"),
    _method("gradcam", gradcam, [GRADIENTS], "weights = spatial mean of the gradient",
            "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
            "Localization, ICCV 2017 (arXiv:1610.02391)"),
    _method("gradcam++", gradcam_plus_plus, [GRADIENTS], "weights = positive gradients weighted by higher-order terms",
            "Chattopadhyay et al., Grad-CAM++: Improved Visual Explanations for Deep Convolutional "
            "Networks, WACV 2018 (arXiv:1710.11063)"),
    _method("xgradcam", xgradcam, [GRADIENTS], "weights = gradient × activation normalised by the channel's sum",
            "Fu et al., Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs, "
            "BMVC 2020 (arXiv:2008.02312)"),
    _method("hirescam", hirescam, [GRADIENTS], "element-wise gradient × activation, summed over channels",
            "Draelos and Carin, Use HiResCAM instead of Grad-CAM for faithful explanations of "
            "convolutional neural networks (arXiv:2011.08891)"),
    _method("layercam", layercam, [GRADIENTS], "element-wise positive gradient × activation, summed over channels",
            "Jiang et al., LayerCAM: Exploring Hierarchical Class Activation Maps for Localization, "
            "IEEE TIP 2021"),
    _method("eigencam", eigencam, [], "first principal component of the activations (no target, no gradient)",
            "Muhammad and Yeasin, Eigen-CAM: Class Activation Map using Principal Components, IJCNN 2020 "
            "(arXiv:2008.00299)", target=False, threaded=True),
    _method("scorecam", weighted_sum, [CHANNEL_SCORES], "weights = softmax of the target logit for the input masked by "
            "each channel (one forward pass per channel)",
            "Wang et al., Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks, "
            "CVPR Workshops 2020 (arXiv:1910.01279); Faster Score-CAM (max_channels): "
            "https://github.com/tabayashi0117/Score-CAM#faster-score-cam"),
    _method("legrad", legrad, [ATTENTION_GRADIENTS], "vision transformers: positive gradient of each block's own "
            "class score w.r.t. its attention probabilities, averaged over heads and queries",
            "Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via Feature Formation "
            "Sensitivity (arXiv:2404.03214), as torchcam 0.5.0 implements it", fuse_raw=True),
)}


def get_method(name: str) -> Method:
    """The registered method called ``name`` (case-insensitive), or an error listing the valid names."""
    method = METHODS.get(name.lower()) if isinstance(name, str) else None
    if method is None:
        raise OnnxcamError(f"unknown CAM method {name!r}; choose one of {', '.join(METHODS)}")
    return method


__all__ = ["METHODS", "Method", "LayerInputs", "NEEDS", "GRADIENTS", "CLASS_WEIGHTS", "CHANNEL_SCORES",
           "ATTENTION_GRADIENTS", "legrad",
           "get_method", "cam", "gradcam", "gradcam_plus_plus", "xgradcam", "hirescam",
           "layercam", "eigencam", "weighted_sum", "scorecam_weights", "channel_masks", "normalize", "resize",
           "layer_to_input", "fuse_layers"]
