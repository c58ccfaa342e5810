"""Independent references computed with torch: activations and gradients by autograd, every CAM method
written out again in torch (pytorch-grad-cam 1.5.x conventions), Score-CAM by torch forward passes.
Nothing here imports onnxcam, so agreement is evidence, not an echo."""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def activations_and_gradients(model, module, x: np.ndarray, targets, call: int = -1):
    """A and d logit[target] / d A at the output of ``module`` (its ``call``-th use in the forward)."""
    outputs = []

    def hook(_module, _inputs, output):
        output.retain_grad()
        outputs.append(output)

    handle = module.register_forward_hook(hook)
    try:
        inputs = torch.from_numpy(x)
        logits = model(inputs)
        targets = torch.as_tensor(np.asarray(targets))
        logits[torch.arange(len(x)), targets].sum().backward()
    finally:
        handle.remove()
    chosen = outputs[call]
    return chosen.detach().numpy(), chosen.grad.numpy(), logits.detach().numpy()


def _spatial(t: torch.Tensor):
    return tuple(range(2, t.ndim))


def _bcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape + (1,) * (like.ndim - 2))


def layer_map(method: str, A: np.ndarray, G: np.ndarray | None = None, weights: np.ndarray | None = None):
    a = torch.from_numpy(A).double()
    g = None if G is None else torch.from_numpy(G).double()
    s = _spatial(a)
    if method == "gradcam":
        cam = (_bcast(g.mean(s), a) * a).sum(1)
    elif method == "gradcam++":
        g2, g3 = g ** 2, g ** 3
        alpha = g2 / (2 * g2 + _bcast(a.sum(s), a) * g3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        cam = (_bcast((torch.relu(g) * alpha).sum(s), a) * a).sum(1)
    elif method == "xgradcam":
        cam = (_bcast((g * a).sum(s) / (a.sum(s) + 1e-7), a) * a).sum(1)
    elif method == "hirescam":
        cam = (g * a).sum(1)
    elif method == "layercam":
        cam = (torch.relu(g) * a).sum(1)
    elif method in ("cam", "scorecam"):
        cam = (_bcast(torch.from_numpy(weights).double(), a) * a).sum(1)
    elif method == "eigencam":
        maps = []
        for sample in a:
            flat = sample.reshape(sample.shape[0], -1).T
            flat = flat - flat.mean(0)
            _, _, vt = np.linalg.svd(flat.numpy(), full_matrices=False)
            maps.append(torch.from_numpy(flat.numpy() @ vt[0]).reshape(sample.shape[1:]))
        cam = torch.stack(maps)
    else:
        raise ValueError(method)
    return torch.relu(cam).numpy()


def _normalise(m: np.ndarray) -> np.ndarray:
    m = m - m.min()
    return m / (m.max() + 1e-7)


def _resize(m: np.ndarray, size) -> np.ndarray:
    if m.ndim == 2:
        return cv2.resize(m.astype(np.float32), (size[1], size[0]))
    mode = {1: "linear", 3: "trilinear"}[m.ndim]
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(size), mode=mode, align_corners=False)[0, 0].numpy()


def final_maps(layer_maps: list[np.ndarray], size) -> np.ndarray:
    """Per layer and image: relu, min/max normalise, resize; then mean over layers and normalise."""
    per_layer = [np.stack([_resize(_normalise(np.maximum(m, 0)), size) for m in lm]) for lm in layer_maps]
    fused = np.maximum(np.stack(per_layer, 1), 0).mean(1)
    return np.stack([_normalise(m) for m in fused]).astype(np.float32)


def scorecam_weights(model, A: np.ndarray, x: np.ndarray, targets, batch: int = 64) -> np.ndarray:
    """pytorch-grad-cam's Score-CAM weights: masks upsampled with corners aligned, normalised per
    channel, input times mask scored by the torch model, softmax over channels."""
    a = torch.from_numpy(A)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[a.ndim - 2]
    up = F.interpolate(a, size=x.shape[2:], mode=mode, align_corners=True)
    flat = up.reshape(up.shape[0], up.shape[1], -1)
    lo, hi = flat.min(-1).values, flat.max(-1).values
    up = (up - _bcast(lo, up)) / (_bcast(hi - lo, up) + 1e-8)
    # A channel whose activation map is constant has an all-zero mask (pytorch-grad-cam's intent; its
    # upsampling rounding can leave ~1e-8 noise there): score the zero input once for those.
    # tests/test_pytorch_gradcam.py checks this rule against pytorch-grad-cam itself (dead and constant
    # non-zero channels), so the oracle does not merely copy onnxcam's rule.
    constant = a.reshape(a.shape[0], a.shape[1], -1).std(-1) == 0
    weights = []
    with torch.no_grad():
        for n, target in enumerate(targets):
            keep = torch.nonzero(~constant[n]).flatten()
            masked = torch.from_numpy(x[n:n + 1]) * up[n][keep][:, None]
            scores = torch.full((a.shape[1],), float(model(torch.zeros_like(masked[:1]))[0, target]),
                                dtype=torch.float64)
            scores[keep] = torch.cat([model(masked[i:i + batch])[:, target]
                                      for i in range(0, len(masked), batch)]).double()
            weights.append(torch.softmax(scores, 0).numpy())
    return np.stack(weights)


def reference_maps(method: str, model, module, x: np.ndarray, targets, call: int = -1,
                   fc_weight: np.ndarray | None = None) -> np.ndarray:
    """The final normalised maps of ``method`` by the torch route."""
    A, G, _ = activations_and_gradients(model, module, x, targets, call)
    weights = None
    if method == "cam":
        weights = fc_weight[np.asarray(targets)]
    elif method == "scorecam":
        weights = scorecam_weights(model, A, x, targets)
    return final_maps([layer_map(method, A, G, weights)], x.shape[2:])


def tiny_classifier_torch(proto):
    """tests/tiny_models.tiny_classifier (rank 2) as a torch module with the same weights: Conv 3x3
    (pad 1) -> ReLU -> global mean -> linear; returns the logits (before the Softmax)."""
    from onnx import numpy_helper
    w = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in proto.graph.initializer}

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_w, self.conv_b = torch.nn.Parameter(w["conv_w"]), torch.nn.Parameter(w["conv_b"])
            self.fc_w, self.fc_b = torch.nn.Parameter(w["fc_w"]), torch.nn.Parameter(w["fc_b"])
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            act = self.relu(F.conv2d(x, self.conv_w, self.conv_b, padding=1))
            return act.mean((2, 3)) @ self.fc_w.T + self.fc_b

    return Tiny().eval()
