"""The Python API: an Explainer builds the augmented model and its session once, then explains many
batches. ``explain()`` is the one-call shortcut.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import layouts, tokens
from .cache import model_digest
from .classifier_head import find_classifier_weights
from .derived import node_table
from .errors import OnnxcamError
from .feeds import InputFeeds, checked_input, probe_shapes, run_in_pieces
from .gradient_models import GradientModels
from .graph import static_dims
from .legrad import LeGradBlocks
from .maps_graph import MAPS_ENGINES, GraphMaps
from .methods import (ATTENTION_GRADIENTS, CHANNEL_SCORES, CLASS_WEIGHTS, GRADIENTS, LayerInputs, Method,
                      get_method)
from .methods.postprocess import fuse_layers, layer_to_input
from .model import LoadedModel, load_model
from .nodes import NodeInfo, resolve_node
from .runtime import Runner, configured_threads
from .scorecam import ScoreCam
from .surgery import TARGET_WEIGHTS, AugmentedModel, build_forward_model, find_logits
from .targets import ScoredOutput, checked_targets, locate_axes, target_weights


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
                 input: str | None = None, feeds: dict | None = None, output: str | None = None,
                 class_axis: int | None = None, maps: str = "auto",
                 tokens_grid: tuple | None = None, prefix_tokens: int | None = None):
        """``input``: the input to explain (multi-input models; the others come from ``feeds``, name ->
        array, one sample or one row per sample); ``output``: the output to score (default: the first,
        or the Softmax input); ``class_axis``: its class axis when the guess (targets.py) is wrong;
        ``threads``: CPU threads for the sessions and EigenCAM's per-image SVDs (default $ONNXCAM_THREADS,
        else every core); ``maps``: where the gradient methods' final maps are computed: ``graph`` (ONNX ops appended to
        the augmented model where that is exact, see maps_graph.py; NumPy elsewhere), ``numpy`` (the
        reference engine), ``auto`` (``graph`` when ``maps_graph.GRAPH_MAPS_BY_DEFAULT``)."""
        if maps not in MAPS_ENGINES:
            raise OnnxcamError(f"unknown maps engine {maps!r}; choose one of {', '.join(MAPS_ENGINES)}")
        self.maps = maps
        self.model: LoadedModel = load_model(model, input)
        self.tokens_grid, self.prefix_tokens = tokens_grid, prefix_tokens   # see onnxcam/tokens.py
        self.feeds = InputFeeds(self.model, feeds)
        self.class_axis = class_axis
        self.output = output
        self._output: ScoredOutput | None = None
        self.provider = provider
        self.grad_backend = grad_backend
        self.probabilities = probabilities
        self.threads = threads
        self.cache = cache
        self.logits_name = find_logits(self.model.view, probabilities, output)
        self.input_layout = layouts.normalize_layout(layout) or layouts.input_layout(self.model.input.shape)
        self._probe_shape, self._probe = probe_shapes(self.model, self.feeds, self.input_layout, input_shape)
        # once: every cache key needs it (the file's own digest when load_model had the whole file)
        self._digest = (self.model.digest or model_digest(self.model.proto)) if cache else None
        # the node table and the scored output's declared shape: both cost shape inference, both cached
        self.candidates, self.logits_declared_shape = node_table(self.model, self._probe, self.logits_name,
                                                                 self._digest)
        self._tokens = tokens_grid is not None or prefix_tokens is not None or tokens.is_transformer(self.model)
        specs = [node] if isinstance(node, str) else list(node)
        if not specs:
            raise OnnxcamError("no node given; pass --node NAME (see `onnxcam nodes MODEL`) or --node auto")
        self.nodes: list[NodeInfo] = [resolve_node(self.model, spec, self.candidates, self.logits_name)
                                      for spec in specs]
        self.gradients = GradientModels(self)
        self._forward_model: tuple[AugmentedModel, Runner] | None = None
        self._logits_shapes: dict[tuple, tuple] = {}
        self._heads: dict[str, object] = {}
        self._unfed_nodes: list[NodeInfo] | None = None
        self._graph_maps = GraphMaps(self)
        self.scorecam = ScoreCam(self.model, self.input_layout, lambda x, sample: self.forward(x, sample)[0],
                                 provider, threads, probabilities, self.feeds.for_batch, output)
        # One table from what a method needs to how it is checked and provided (see methods.NEEDS).
        self._needs = {
            GRADIENTS: (self.augmented_gradient_model, lambda batch, i: batch.gradients[i]),
            CLASS_WEIGHTS: (self._check_classifier_heads,
                            lambda batch, i: self.classifier_head(self.nodes[i]).weight[batch.chosen]),
            CHANNEL_SCORES: (self._check_scorecam, self._scorecam_weights),
            ATTENTION_GRADIENTS: (lambda: self.legrad.blocks(), lambda batch, i: self.legrad.gradients(
                i, batch.x, batch.chosen, self.num_classes(batch.x))),
        }
        self.legrad = LeGradBlocks(self.model, self.nodes, self.candidates, grad_backend, provider, threads,
                                   self._probe, self._digest)

    # ---- set-up -------------------------------------------------------------------------------
    @property
    def probe_shape(self) -> tuple | None:
        """A concrete input shape (batch 1) for this model, when one is known."""
        return self._probe_shape

    @property
    def tensors(self) -> list[str]:
        return [n.tensor for n in self.nodes]

    def augmented_gradient_model(self, x: np.ndarray | None = None) -> AugmentedModel:
        """The one model with logits, activations and their gradients, for the batch ``x`` (built
        without a session; see gradient_models.py for when it is specialised to the batch's shape)."""
        return self.gradients.build(x)[1]

    def gradient_session(self, x: np.ndarray | None = None) -> tuple[AugmentedModel, Runner]:
        """The gradient model and its session (for the batch ``x`` when it had to be specialised)."""
        return self.gradients.session(x)

    def forward_session(self) -> tuple[AugmentedModel, Runner]:
        if self._forward_model is None:
            augmented = build_forward_model(self.model, self.tensors, self.probabilities, self.output)
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
        return self.gradients.backend_used

    def num_classes(self, x: np.ndarray) -> int:
        """K: the class axis of the scored output."""
        return self._logits_shape(x)[1]

    def scored_output(self, x: np.ndarray) -> ScoredOutput:
        """Where the scored output keeps its batch and class axes (found once, see targets.py)."""
        if self._output is None:
            def probe(n: int) -> tuple:
                return tuple(self._run_forward(np.repeat(x[:1], n, axis=0))[0].shape)
            self._output = locate_axes(self.logits_name, self.logits_declared_shape,
                                       self.model.input.shape, self.input_layout, probe, self.class_axis)
        return self._output

    @property
    def logits_static_shape(self) -> tuple | None:
        """The scored output's declared shape with every dim not a known positive int as None."""
        return static_dims(self.logits_declared_shape)

    def _logits_shape(self, x: np.ndarray) -> tuple:
        """Canonical shape (N, K, *positions) of the scored output for batch ``x``: static when the
        graph says so, else from one forward run per input shape (remembered)."""
        out = self.scored_output(x)
        key = x.shape[1:]
        if key not in self._logits_shapes:
            declared = self.logits_static_shape
            if declared is not None and len(declared) == out.rank and all(
                    d is not None for i, d in enumerate(declared) if i != out.batch_axis):
                shape = out.canonical(np.empty([1 if i == out.batch_axis else d for i, d in enumerate(declared)],
                                               np.uint8)).shape
            else:
                shape = self.forward(x[:1])[0].shape
            self._logits_shapes[key] = tuple(shape[1:])
        return (x.shape[0], *self._logits_shapes[key])

    def check_method(self, method: str) -> None:
        """Raise OnnxcamError when ``method`` cannot run on this model and node."""
        spec = get_method(method)
        if spec.needs:
            self._check_nodes_feed_the_output(spec.name)
        for need in spec.needs:
            self._needs[need][0]()

    def _check_nodes_feed_the_output(self, method: str) -> None:
        """A node the scored output does not depend on has a zero gradient and no effect on the score:
        say so instead of drawing an empty map."""
        if self._unfed_nodes is None:      # walked once: every explain call checks it
            upstream = self.model.view.ancestors(self.logits_name)
            self._unfed_nodes = [node for node in self.nodes if node.tensor not in upstream]
        for node in self._unfed_nodes:
            raise OnnxcamError(f"node {node.name or node.tensor} does not feed the scored output "
                               f"{self.logits_name!r}, so {method} has nothing to measure there; pick a "
                               "node that does (`onnxcam nodes MODEL` marks the others with x), or use "
                               "--method eigencam")

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
        return checked_input(x, self.model.input)

    def forward(self, x: np.ndarray, sample: int | None = None) -> list[np.ndarray]:
        """The scored output in canonical (N, K, *positions) order, then the activations of the chosen
        nodes; no gradients. A model with a fixed batch runs in pieces of it. ``sample``: every row of
        ``x`` stands for that input (the other inputs take its row)."""
        out = self.scored_output(x)
        augmented, runner = self.forward_session()
        outputs = run_in_pieces(runner.run, self._batched(augmented, x, sample),
                                [out.batch_axis] + [0] * len(self.nodes), self.feeds.fixed_batch)
        return [out.canonical(outputs[0]), *outputs[1:]]

    def _run_forward(self, x: np.ndarray) -> list[np.ndarray]:
        """One plain run of the forward model (outputs in their own order; the batch as the model takes it)."""
        augmented, runner = self.forward_session()
        return runner.run({name: array for name, (array, _) in self._batched(augmented, x).items()})

    def _batched(self, augmented: AugmentedModel, x: np.ndarray, sample: int | None = None, **extra) -> dict:
        """Feeds for a run over batch ``x``: name -> (array, its batch axis)."""
        feeds = {augmented.input_name: (x, 0)}
        feeds.update({name: (array, 0) for name, array in self.feeds.for_batch(len(x), sample).items()})
        feeds.update(extra)
        return feeds

    def input_spatial(self, x: np.ndarray) -> tuple:
        return layouts.spatial_shape(x.shape, self.input_layout)

    def explain(self, x, method: str = "gradcam", targets=None, batch_size: int | None = None,
                max_channels: int | None = None, progress=None, target_mask=None) -> Explanation:
        """Explain a preprocessed batch ``x`` (the model's own layout) with ``method``.

        ``target_mask``: for outputs with positions (maps N, K, *S; sequences), the score is the target
        class summed over this mask (shape S, or (N, *S)); without it, over every position.
        """
        spec = get_method(method)
        return self.explain_many(x, [spec.name], targets, batch_size, max_channels, progress,
                                 target_mask)[spec.name]

    def explain_many(self, x, methods, targets=None, batch_size: int | None = None,
                     max_channels: int | None = None, progress=None,
                     target_mask=None) -> dict[str, Explanation]:
        """One Explanation per method (keyed by its registered name, in the order given), from ONE run
        of the model per batch: every gradient method reads the same activations and gradients, and
        CAM, EigenCAM and Score-CAM read that run's activations too (Score-CAM then scores its masks).
        The maps equal those of separate ``explain`` calls (same engine, same inputs)."""
        start = time.perf_counter()
        specs = list({spec.name: spec for spec in (get_method(m) for m in methods)}.values())
        if not specs:
            raise OnnxcamError("no method given")
        for spec in specs:
            if spec.needs:
                self._check_nodes_feed_the_output(spec.name)
        x = self.check_input(x)
        n = x.shape[0]
        wanted = checked_targets(targets, n, self.num_classes(x)) if targets is not None else None
        mask = None if target_mask is None else np.asarray(target_mask, np.float32)
        per_sample_mask = mask is not None and mask.ndim == len(self._logits_shape(x)) - 1
        step = batch_size or n
        parts = []
        for lo in range(0, n, step):
            part_targets = None if wanted is None else wanted[lo:lo + step]
            part_mask = mask[lo:lo + step] if per_sample_mask else mask
            parts.append(self._explain_batch(x[lo:lo + step], specs, part_targets, part_mask, max_channels,
                                             progress, batch_size))
        shared = sum(p[0] for p in parts)
        result = {}
        for spec in specs:
            per = [p[1][spec.name] for p in parts]

            def joined(arrays: list) -> np.ndarray:    # one batch: its arrays as they are, no copy
                return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            maps, logits, chosen, scores = (joined([p[i] for p in per]) for i in range(4))
            layer_maps = [joined([p[4][i] for p in per]) for i in range(len(self.nodes))]
            seconds = shared + sum(p[5] for p in per)
            result[spec.name] = Explanation(maps, chosen, scores, logits, spec.name,
                                            [node.name for node in self.nodes], layer_maps, seconds)
        if len(specs) == 1:      # one method: its time is the whole call's, input checks included
            result[specs[0].name].seconds = time.perf_counter() - start
        return result

    def target_weights(self, logits_shape: tuple, targets: np.ndarray | None,
                       mask: np.ndarray | None) -> np.ndarray:
        """Canonical W for the score head (see targets.target_weights)."""
        return target_weights(logits_shape, targets, mask)

    def _explain_batch(self, x, specs: list[Method], targets, mask, max_channels, progress, batch_size):
        """One run for the batch, then each method's maps: (run seconds, {name: (maps, logits, chosen,
        scores, layer maps, seconds)})."""
        start = time.perf_counter()
        n, m = x.shape[0], len(self.nodes)
        out = self.scored_output(x)
        plan = self._graph_maps.plan(specs, x)
        in_graph: tuple[str, ...] = ()
        if plan is not None:       # outputs: logits, maps per method, layer maps per method and node,
            in_graph, node_layouts, with_activations = plan          # then the activations if asked
            _, runner = self._graph_maps.session(in_graph, node_layouts, with_activations)
            head_weights = self.target_weights(self._logits_shape(x), targets, mask)
            outputs = runner.run({self.model.input.name: x, TARGET_WEIGHTS: head_weights})
            tail = 1 + len(in_graph) * (1 + m)
            graph_outputs, outputs = outputs[:tail], [outputs[0], *outputs[tail:]]
        elif any(GRADIENTS in spec.needs for spec in specs):
            augmented, runner = self.gradient_session(x)
            head_weights = out.own(self.target_weights(self._logits_shape(x), targets, mask))
            outputs = run_in_pieces(runner.run, self._batched(augmented, x, **{TARGET_WEIGHTS: (
                head_weights, out.batch_axis)}), [out.batch_axis] + [0] * (2 * m), self.feeds.fixed_batch)
            outputs[0] = out.canonical(outputs[0])
        else:
            outputs = self.forward(x)
        logits = outputs[0]
        map_weights = None            # outputs with positions (N, K, *P): the target planes summed over
        if logits.ndim > 2 and targets is None and not all(spec.needs_target for spec in specs):
            chosen, scores = np.full(n, -1, np.int64), np.full(n, np.nan, np.float32)   # EigenCAM only
        elif logits.ndim > 2:
            map_weights = self.target_weights(logits.shape, targets, mask)
            chosen = targets
            scores = (logits * map_weights).reshape(n, -1).sum(1)
        else:
            chosen = targets if targets is not None else np.argmax(logits, axis=1)
            scores = logits[np.arange(n), chosen]
        chosen, scores = np.asarray(chosen, np.int64), scores.astype(np.float32)
        results = {name: (graph_outputs[1 + j], logits, chosen, scores,
                          graph_outputs[1 + len(in_graph) + j * m:1 + len(in_graph) + (j + 1) * m], 0.0)
                   for j, name in enumerate(in_graph)}
        activations = [self._channels_first(a, x) for a in outputs[1:1 + m]]
        gradients = [self._channels_first(g, x, like=a) for g, a in zip(outputs[1 + m:1 + 2 * m],
                                                                        outputs[1:1 + m])]
        batch = _Batch(x, chosen, map_weights, activations, gradients,
                       dict(batch_size=batch_size, max_channels=max_channels, progress=progress))
        size = self.input_spatial(x)
        threads = configured_threads(self.threads)     # EigenCAM's per-sample SVDs, as many as the session's
        shared = time.perf_counter() - start
        for spec in specs:
            if spec.name in results:
                continue
            begin = time.perf_counter()
            layer_maps = [spec.layer_map(LayerInputs(a, **{need: self._needs[need][1](batch, i)
                                                            for need in spec.needs}, threads=threads))
                          for i, a in enumerate(activations)]
            if spec.fuse_raw:     # LeGrad: the blocks' maps averaged before the one normalisation
                maps = fuse_layers([layer_to_input(np.mean(layer_maps, axis=0), size)])
            else:
                maps = fuse_layers([layer_to_input(lm, size) for lm in layer_maps])
            results[spec.name] = (maps.astype(np.float32), logits, chosen, scores, layer_maps,
                                  time.perf_counter() - begin)
        return shared, {spec.name: results[spec.name] for spec in specs}

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
