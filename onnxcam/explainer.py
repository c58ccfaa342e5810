"""The Python API: an Explainer builds the augmented model and its session once, then explains many
batches. ``explain()`` is the one-call shortcut.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import layouts, tokens
from .cache import cached_model
from .classifier_head import find_classifier_weights
from .errors import OnnxcamError, shape_text
from .gradients import ort_training_available
from .preprocess import Preprocessing
from .legrad import LeGradBlocks
from .methods import ATTENTION_GRADIENTS, CHANNEL_SCORES, CLASS_WEIGHTS, GRADIENTS, LayerInputs, Method, get_method
from .methods.postprocess import fuse_layers, layer_to_input
from .model import LoadedModel, load_model
from .nodes import NodeInfo, list_candidates, resolve_node
from .runtime import Runner
from .scorecam import ScoreCam
from .shape_fill import with_measured_shapes
from .surgery import (TARGET_WEIGHTS, AugmentedModel, build_forward_model, build_gradient_augmented_model,
                      find_logits)


@dataclass
class Explanation:
    """Maps in [0, 1] at the input's spatial size, and what they explain."""
    maps: np.ndarray                 # (N, *input spatial) float32
    targets: np.ndarray              # (N,) class explained per sample
    scores: np.ndarray               # (N,) target logit per sample
    logits: np.ndarray               # (N, K)
    method: str
    nodes: list[str]
    layer_maps: list[np.ndarray] = field(default_factory=list)   # per node, at layer resolution
    seconds: float = 0.0


class Explainer:
    """Explain one model at one or more nodes; sessions are built on first use and reused."""

    def __init__(self, model, node: str | list[str] = "auto", provider: str = "auto",
                 grad_backend: str = "auto", layout: str | None = None, probabilities: bool = False,
                 input_shape: tuple | None = None, threads: int | None = None, cache: bool = True,
                 tokens_grid: tuple | None = None, prefix_tokens: int | None = None):
        self.model: LoadedModel = load_model(model)
        self.tokens_grid, self.prefix_tokens = tokens_grid, prefix_tokens   # see onnxcam/tokens.py
        self.provider = provider
        self.grad_backend = grad_backend
        self.probabilities = probabilities
        self.threads = threads
        self.cache = cache
        self.logits_name = find_logits(self.model.view, probabilities)
        self.input_layout = layouts.normalize_layout(layout) or layouts.input_layout(self.model.input.shape)
        self._probe = self._probe_shapes(input_shape)
        self.candidates = list_candidates(self.model, self._probe)
        self._tokens = tokens_grid is not None or prefix_tokens is not None or tokens.is_transformer(self.model)
        specs = [node] if isinstance(node, str) else list(node)
        if not specs:
            raise OnnxcamError("no node given; pass --node NAME (see `onnxcam nodes MODEL`) or --node auto")
        self.nodes: list[NodeInfo] = [resolve_node(self.model, spec, self.candidates) for spec in specs]
        self._gradient_model: tuple[AugmentedModel, Runner] | None = None
        self._forward_model: tuple[AugmentedModel, Runner] | None = None
        self._static_logits_shape: tuple | None = None
        self._logits_shapes: dict[tuple, tuple] = {}
        self._heads: dict[str, object] = {}
        self.scorecam = ScoreCam(self.model, self.input_layout, lambda x: self.forward(x)[0], provider,
                                 threads, probabilities)
        # One table from what a method needs to how it is checked and provided (see methods.NEEDS).
        self._needs = {
            GRADIENTS: (self.gradient_session, lambda batch, i: batch.gradients[i]),
            CLASS_WEIGHTS: (self._check_classifier_heads,
                            lambda batch, i: self.classifier_head(self.nodes[i]).weight[batch.chosen]),
            CHANNEL_SCORES: (self._check_scorecam, self._scorecam_weights),
            ATTENTION_GRADIENTS: (lambda: self.legrad.blocks(), lambda batch, i: self.legrad.gradients(
                i, batch.x, batch.chosen, self.num_classes(batch.x))),
        }
        self.legrad = LeGradBlocks(self.model, self.nodes, self.candidates, grad_backend, provider, threads,
                                   self._probe)

    # ---- set-up -------------------------------------------------------------------------------
    def _probe_shapes(self, input_shape: tuple | None) -> dict[str, tuple] | None:
        spec = self.model.input
        if input_shape is not None:
            return {spec.name: tuple(input_shape)}
        if spec.shape is None:
            return None
        dims = [1 if i == 0 else d for i, d in enumerate(spec.shape)]
        if all(isinstance(d, int) and d > 0 for d in dims):
            return {spec.name: tuple(dims)}
        if len(dims) != 4:
            return None
        layout = "NCHW" if self.input_layout == layouts.FIRST else "NHWC"
        preprocessing = replace(Preprocessing.from_metadata(self.model.preprocess, spec.shape), layout=layout)
        probe = preprocessing.probe_shape(spec.shape)
        return {spec.name: probe} if probe else None

    @property
    def probe_shape(self) -> tuple | None:
        """A concrete input shape (batch 1) for this model, when one is known."""
        return (self._probe or {}).get(self.model.input.name)

    @property
    def tensors(self) -> list[str]:
        return [n.tensor for n in self.nodes]

    def augmented_gradient_model(self) -> AugmentedModel:
        """The one model with logits, activations and their gradients (built without a session).

        Built once per (model bytes, nodes, backend, ...) and kept in the on-disk cache, so a second
        run on the same model skips surgery and gradient building."""
        if self._gradient_model is not None:
            return self._gradient_model[0]

        def build() -> onnx.ModelProto:
            model = replace(self.model, proto=with_measured_shapes(self.model.proto, self._probe))
            return build_gradient_augmented_model(model, self.tensors, self.grad_backend,
                                                  self.probabilities).proto

        if not self.cache:
            proto = build()
        else:
            parts = {"family": "gradient", "nodes": self.tensors, "backend": self.grad_backend,
                     "probabilities": self.probabilities, "training_runtime": ort_training_available()}
            proto = cached_model(parts, self.model.proto, build)
        return AugmentedModel.from_gradient_proto(proto, self.model.input.name, self.logits_name,
                                                  self.tensors)

    def gradient_session(self) -> tuple[AugmentedModel, Runner]:
        if self._gradient_model is None:
            augmented = self.augmented_gradient_model()
            self._gradient_model = (augmented, Runner(augmented.proto, augmented.output_names,
                                                      self.provider, self.threads))
        return self._gradient_model

    def forward_session(self) -> tuple[AugmentedModel, Runner]:
        if self._forward_model is None:
            augmented = build_forward_model(self.model, self.tensors, self.probabilities)
            self._forward_model = (augmented, Runner(augmented.proto, augmented.output_names,
                                                     self.provider, self.threads))
        return self._forward_model

    def classifier_head(self, node: NodeInfo):
        """The GAP -> linear classifier weights CAM reads for ``node`` (found once, then cached)."""
        if node.tensor not in self._heads:
            self._heads[node.tensor] = find_classifier_weights(self.model.proto, node.tensor)
        return self._heads[node.tensor]

    @property
    def gradient_backend_used(self) -> str | None:
        return self._gradient_model[0].backend if self._gradient_model else None

    def num_classes(self, x: np.ndarray) -> int:
        """K: the class axis of the scored output."""
        return self._logits_shape(x)[1]

    def _logits_shape(self, x: np.ndarray) -> tuple:
        """Shape of the scored output for batch ``x``: static when the graph says so, else from one
        forward run per input shape (remembered)."""
        if self._static_logits_shape is None:
            shape = self.model.view.static_shape(self.logits_name)
            static = shape is not None and all(isinstance(d, int) and d > 0 for d in shape[1:])
            self._static_logits_shape = tuple(shape[1:]) if static else ()
        if self._static_logits_shape:
            return (x.shape[0], *self._static_logits_shape)
        key = x.shape[1:]
        if key not in self._logits_shapes:
            self._logits_shapes[key] = tuple(self.forward(x[:1])[0].shape[1:])
        return (x.shape[0], *self._logits_shapes[key])

    def check_method(self, method: str) -> None:
        """Raise OnnxcamError when ``method`` cannot run on this model and node."""
        for need in get_method(method).needs:
            self._needs[need][0]()

    def _check_classifier_heads(self) -> None:
        for node in self.nodes:
            self.classifier_head(node)

    def _check_scorecam(self) -> None:
        for node in self.nodes:
            rank = len(node.shape) if node.shape is not None else None
            self.scorecam.check(node.name, 4 if self.node_token_grid(node) is not None else rank)

    def node_token_grid(self, node: NodeInfo, input_spatial: tuple | None = None):
        """The patch grid of a token node (N, T, C) on this input size, else None (see tokens.py)."""
        if input_spatial is None:
            probe = self.probe_shape
            if probe is None:
                return None
            input_spatial = layouts.spatial_shape(probe, self.input_layout)
        if not self._tokens:
            return None
        return tokens.token_grid(node.shape, input_spatial, self.tokens_grid, self.prefix_tokens)

    # ---- running ------------------------------------------------------------------------------
    def check_input(self, x) -> np.ndarray:
        """A float32 batch of the model's rank whose static dims match the model input."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise OnnxcamError(f"input must be a numeric array, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        shape = self.model.input.shape
        if shape is not None:
            if x.ndim != len(shape):
                raise OnnxcamError(f"input has shape {x.shape} but the model takes rank {len(shape)} "
                                   f"{shape_text(shape)}; add the batch axis / fix the layout")
            for axis, (got, want) in enumerate(zip(x.shape, shape)):
                if axis > 0 and isinstance(want, int) and want > 0 and got != want:
                    raise OnnxcamError(f"input has shape {x.shape} but the model takes "
                                       f"{shape_text(shape)}; resize the input (--size) or fix --layout")
        if x.shape[0] == 0:
            raise OnnxcamError("the input batch is empty")
        return x

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Logits and activations of the chosen nodes, no gradients."""
        augmented, runner = self.forward_session()
        return runner.run({augmented.input_name: x})

    def input_spatial(self, x: np.ndarray) -> tuple:
        return layouts.spatial_shape(x.shape, self.input_layout)

    def _targets(self, targets, n: int, num_classes: int) -> np.ndarray | None:
        if targets is None:
            return None
        array = np.atleast_1d(np.asarray(targets))
        if array.dtype.kind not in "iu":
            raise OnnxcamError(f"targets must be class indices (integers), got {targets!r}")
        if array.size == 1 and n > 1:
            array = np.repeat(array, n)
        if array.shape != (n,):
            raise OnnxcamError(f"got {array.size} targets for {n} inputs; give one class or one per input")
        bad = array[(array < 0) | (array >= num_classes)]
        if bad.size:
            raise OnnxcamError(f"target class {int(bad[0])} is out of range: the model has {num_classes} "
                               f"classes (0-{num_classes - 1})")
        return array.astype(np.int64)

    def explain(self, x, method: str = "gradcam", targets=None, batch_size: int | None = None,
                max_channels: int | None = None, progress=None, target_mask=None) -> Explanation:
        """Explain a preprocessed batch ``x`` (the model's own layout) with ``method``.

        ``target_mask``: for models whose output is a map (N, K, *S), the score is the target class's
        logits summed over this mask (shape S, or (N, *S)); without it, over the whole map.
        """
        start = time.perf_counter()
        spec = get_method(method)
        x = self.check_input(x)
        n = x.shape[0]
        wanted = self._targets(targets, n, self.num_classes(x)) if targets is not None else None
        mask = None if target_mask is None else np.asarray(target_mask, np.float32)
        per_sample_mask = mask is not None and mask.ndim == self._output_rank(x) - 1
        step = batch_size or n
        parts = []
        for lo in range(0, n, step):
            part_targets = None if wanted is None else wanted[lo:lo + step]
            part_mask = mask[lo:lo + step] if per_sample_mask else mask
            parts.append(self._explain_batch(x[lo:lo + step], spec, part_targets, part_mask, max_channels,
                                             progress, batch_size))
        maps, logits, chosen, scores = (np.concatenate([p[i] for p in parts]) for i in range(4))
        layer_maps = [np.concatenate([p[4][i] for p in parts]) for i in range(len(self.nodes))]
        return Explanation(maps, chosen, scores, logits, spec.name, [node.name for node in self.nodes],
                           layer_maps, time.perf_counter() - start)

    def _output_rank(self, x: np.ndarray) -> int:
        return len(self._logits_shape(x))

    def target_weights(self, logits_shape: tuple, targets: np.ndarray | None,
                       mask: np.ndarray | None) -> np.ndarray:
        """W for the score head: zero rows (arg-max) or one-hot rows; for map outputs, the target
        class's plane holds the mask (or ones)."""
        weights = np.zeros(logits_shape, np.float32)
        n = logits_shape[0]
        if len(logits_shape) == 2:
            if mask is not None:
                raise OnnxcamError("--target-mask applies to models whose output is a map (N, K, H, W); "
                                   f"this model outputs {tuple(logits_shape)}")
            if targets is not None:
                weights[np.arange(n), targets] = 1.0
            return weights
        if targets is None:
            raise OnnxcamError(f"the model outputs a map {tuple(logits_shape)}; say which class to explain "
                               "with --target (and optionally --target-mask)")
        plane = np.ones(logits_shape[2:], np.float32)
        if mask is not None:
            expected = tuple(logits_shape[2:])
            if mask.shape not in (expected, (n, *expected)):
                raise OnnxcamError(f"--target-mask has shape {mask.shape} but the model's output map is "
                                   f"{expected}; give a mask of that size")
            plane = mask
        weights[np.arange(n), targets] = plane
        return weights

    def _explain_batch(self, x, spec: Method, targets, mask, max_channels, progress, batch_size):
        n = x.shape[0]
        if GRADIENTS in spec.needs:
            augmented, runner = self.gradient_session()
            head_weights = self.target_weights(self._logits_shape(x), targets, mask)
            outputs = runner.run({augmented.input_name: x, TARGET_WEIGHTS: head_weights})
        else:
            outputs = self.forward(x)
        logits = outputs[0]
        map_weights = None            # map outputs (N, K, *S): the target planes the score sums over
        if logits.ndim > 2 and targets is None and not spec.needs_target:   # EigenCAM: nothing to score
            chosen, scores = np.full(n, -1, np.int64), np.full(n, np.nan, np.float32)
        elif logits.ndim > 2:
            map_weights = self.target_weights(logits.shape, targets, mask)
            chosen = targets
            scores = (logits * map_weights).reshape(n, -1).sum(1)
        else:
            chosen = targets if targets is not None else np.argmax(logits, axis=1)
            scores = logits[np.arange(n), chosen]
        m = len(self.nodes)
        activations = [self._channels_first(a, x) for a in outputs[1:1 + m]]
        gradients = [self._channels_first(g, x, like=a) for g, a in zip(outputs[1 + m:1 + 2 * m],
                                                                        outputs[1:1 + m])]
        batch = _Batch(x, np.asarray(chosen, np.int64), map_weights, activations, gradients,
                       dict(batch_size=batch_size, max_channels=max_channels, progress=progress))
        layer_maps = [spec.layer_map(LayerInputs(a, **{need: self._needs[need][1](batch, i)
                                                        for need in spec.needs}))
                      for i, a in enumerate(activations)]
        size = self.input_spatial(x)
        if spec.fuse_raw:     # LeGrad: the blocks' maps averaged before the one normalisation
            maps = fuse_layers([layer_to_input(np.mean(layer_maps, axis=0), size)])
        else:
            maps = fuse_layers([layer_to_input(lm, size) for lm in layer_maps])
        return (maps.astype(np.float32), logits, batch.chosen, scores.astype(np.float32), layer_maps)

    def _channels_first(self, array: np.ndarray, x: np.ndarray, like: np.ndarray | None = None):
        reference = array if like is None else like
        grid = tokens.token_grid(reference.shape, self.input_spatial(x), self.tokens_grid,
                                 self.prefix_tokens) if self._tokens else None
        if grid is not None:
            return grid.to_map(array)
        layout = layouts.activation_layout(reference.shape, self.input_spatial(x), self.input_layout)
        return layouts.to_channels_first(array, layout)

    def _scorecam_weights(self, batch: "_Batch", i: int) -> np.ndarray:
        return self.scorecam.weights(self.nodes[i].name, batch.activations[i], batch.x, batch.chosen,
                                     batch.map_weights, **batch.options)


@dataclass
class _Batch:
    """What one run of the model gave for a batch, read by the need providers."""
    x: np.ndarray
    chosen: np.ndarray
    map_weights: np.ndarray | None
    activations: list[np.ndarray]
    gradients: list[np.ndarray]
    options: dict


def explain(model, x, node: str | list[str] = "auto", method: str = "gradcam", targets=None,
            provider: str = "auto", grad_backend: str = "auto") -> np.ndarray:
    """Maps (N, *spatial of x) float32 in [0, 1] for a preprocessed batch ``x``."""
    explainer = Explainer(model, node, provider=provider, grad_backend=grad_backend)
    return explainer.explain(x, method=method, targets=targets).maps
