"""The NumPy CAM engine: one pure function per method, a registry describing what each needs, and the
post-processing shared by all. Arrays are channels-first, (N, C, *S) with 1 to 3 spatial axes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import OnnxcamError
from ._arrays import weighted_sum
from .eigencam import eigencam
from .gradient_based import cam, gradcam, gradcam_plus_plus, hirescam, layercam, xgradcam
from .postprocess import fuse_layers, layer_to_input, normalize, resize
from .scorecam import channel_masks, scorecam_weights


@dataclass(frozen=True)
class Method:
    """What a CAM method needs from the model, and the function giving its map at layer resolution.

    ``layer_map`` signature by kind: ``(A, G)`` when ``needs_gradients``; ``(A, class_weights)`` when
    ``needs_classifier_weights``; ``(A, w)`` with ``w = scorecam_weights(...)`` when ``needs_forward``;
    ``(A)`` otherwise.
    """
    name: str
    needs_gradients: bool
    needs_classifier_weights: bool
    needs_forward: bool
    needs_target: bool
    layer_map: Callable
    description: str
    paper: str


def _method(name, layer_map, description, paper, *, gradients=False, classifier=False, forward=False,
            target=True) -> Method:
    return Method(name, gradients, classifier, forward, target, layer_map, description, paper)


METHODS: dict[str, Method] = {m.name: m for m in (
    _method("cam", cam, "weights = the classifier's row for the target, after global average pooling",
            "Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016 "
            "(arXiv:1512.04150)", classifier=True),
    _method("gradcam", gradcam, "weights = spatial mean of the gradient",
            "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
            "Localization, ICCV 2017 (arXiv:1610.02391)", gradients=True),
    _method("gradcam++", gradcam_plus_plus, "weights = positive gradients weighted by higher-order terms",
            "Chattopadhyay et al., Grad-CAM++: Improved Visual Explanations for Deep Convolutional "
            "Networks, WACV 2018 (arXiv:1710.11063)", gradients=True),
    _method("xgradcam", xgradcam, "weights = gradient × activation normalised by the channel's sum",
            "Fu et al., Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs, "
            "BMVC 2020 (arXiv:2008.02312)", gradients=True),
    _method("hirescam", hirescam, "element-wise gradient × activation, summed over channels",
            "Draelos and Carin, Use HiResCAM instead of Grad-CAM for faithful explanations of "
            "convolutional neural networks (arXiv:2011.08891)", gradients=True),
    _method("layercam", layercam, "element-wise positive gradient × activation, summed over channels",
            "Jiang et al., LayerCAM: Exploring Hierarchical Class Activation Maps for Localization, "
            "IEEE TIP 2021", gradients=True),
    _method("eigencam", eigencam, "first principal component of the activations (no target, no gradient)",
            "Muhammad and Yeasin, Eigen-CAM: Class Activation Map using Principal Components, IJCNN 2020 "
            "(arXiv:2008.00299)", target=False),
    _method("scorecam", weighted_sum, "weights = softmax of the target logit for the input masked by "
            "each channel (one forward pass per channel)",
            "Wang et al., Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks, "
            "CVPR Workshops 2020 (arXiv:1910.01279); Faster Score-CAM (max_channels): "
            "https://github.com/tabayashi0117/Score-CAM#faster-score-cam", forward=True),
)}


def get_method(name: str) -> Method:
    """The registered method called ``name`` (case-insensitive), or an error listing the valid names."""
    method = METHODS.get(name.lower()) if isinstance(name, str) else None
    if method is None:
        raise OnnxcamError(f"unknown CAM method {name!r}; choose one of {', '.join(METHODS)}")
    return method


__all__ = ["METHODS", "Method", "get_method", "cam", "gradcam", "gradcam_plus_plus", "xgradcam", "hirescam",
           "layercam", "eigencam", "weighted_sum", "scorecam_weights", "channel_masks", "normalize", "resize",
           "layer_to_input", "fuse_layers"]
