"""LeGrad on an ONNX vision transformer: per explained block, a model that scores the block's own tokens
and returns the gradient of that score with respect to the block's attention probabilities.

As torchcam 0.5.0 defines LeGrad (``torchcam.methods.LeGrad`` on torchvision's VisionTransformer), the
score of block l is the model's head applied to its final norm of the block's output tokens averaged
over all tokens: ``s_l = head(norm(mean_T(tokens_l)))``, and the gradient is taken with respect to
the block's post-Softmax attention probabilities (N, heads, queries, keys).

Everything is found from the graph:

- the block of a node: the innermost module scope around the node that holds exactly one attention
  Softmax (over the last, key, axis); the block's output is the last rank-3 tensor made in that scope.
  So ``--node encoder/layers/encoder_layer_11`` and the default ViT node (that block's ``ln_1``)
  both name block 11.
- the head: the last normalisation node of the graph, the token selection after it (``x[:, 0]``:
  Gather / Slice / Squeeze on the token axis) and every node from there to the logits. The copy
  starts from the mean over tokens instead of the selection.

Each block's gradient model is built once (the logits of the copy get the usual score head: the
target class weights W), cached on disk with the model's other derived models (a warm Explainer
builds none: no probe run, no gradient surgery) and kept in a session.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .cache import cached_model_bytes
from .errors import OnnxcamError
from .gradients import build_gradient_model, ort_training_available
from .graph import GraphBuilder, GraphView, attribute, copy_model
from .nodes import NodeInfo, node_scope
from .runtime import Runner
from .shape_fill import with_measured_shapes
from .surgery import SCORE, TARGET_WEIGHTS, add_target_head, find_logits, set_outputs
from .tokens import _NORMS

_SELECTIONS = {"Gather", "Slice", "Squeeze"}


@dataclass(frozen=True)
class Block:
    scope: str
    output: str          # the block's output tokens (N, T, C)
    attention: str       # its attention probabilities, the Softmax output


def _softmaxes(view: GraphView) -> list[onnx.NodeProto]:
    found = []
    for node in view.graph.node:
        if node.op_type != "Softmax":
            continue
        rank = view.rank(node.input[0])
        axis = attribute(node, "axis", -1 if view.opset >= 13 else 1)
        if axis == -1 or (rank is not None and axis == rank - 1):
            found.append(node)
    return found


def find_block(view: GraphView, node: NodeInfo, candidates: list[NodeInfo]) -> Block:
    """The transformer block ``node`` lies in (see the module docstring)."""
    softmaxes = [(s, node_scope(s)) for s in _softmaxes(view)]
    if not softmaxes:
        raise OnnxcamError("LeGrad needs a vision transformer: this graph has no attention Softmax over the "
                           "key axis")
    tokens = {c.tensor for c in candidates if c.shape is not None and len(c.shape) == 3}
    parts = node.scope.split("/") if node.scope else []
    for end in range(len(parts), 0, -1):
        prefix = parts[:end]
        inside = [s for s, scope in softmaxes if scope[:end] == prefix]
        if len(inside) == 1:
            made = [n.output[0] for n in view.graph.node if n.output and node_scope(n)[:end] == prefix
                    and n.output[0] in tokens]
            if made:
                return Block("/".join(prefix), made[-1], inside[0].output[0])
    # no module scopes: the node is the block output, its attention the nearest Softmax upstream
    attention = _nearest_upstream(view, node.tensor, {s.output[0] for s, _ in softmaxes})
    if attention is None or node.tensor not in tokens:
        raise OnnxcamError(f"LeGrad: cannot find the transformer block of node {node.name or node.tensor}; "
                           "give a block's module scope as --node (e.g. encoder/layers/encoder_layer_11)")
    return Block(node.scope, node.tensor, attention)


def _nearest_upstream(view: GraphView, tensor: str, targets: set[str]) -> str | None:
    seen, queue = {tensor}, deque([tensor])
    while queue:
        current = queue.popleft()
        if current in targets:
            return current
        producer = view.producer.get(current)
        for name in producer.input if producer is not None else []:
            if name and name not in seen:
                seen.add(name)
                queue.append(name)
    return None


def _head(view: GraphView, logits: str) -> tuple[onnx.NodeProto, str, list[onnx.NodeProto]]:
    """(final norm, the token selection's output, the nodes from there to the logits)."""
    norms = [n for n in view.graph.node if n.op_type in _NORMS]
    if not norms:
        raise OnnxcamError("LeGrad needs the transformer's final LayerNorm before its head; none in this graph")
    norm = norms[-1]
    selected = norm.output[0]
    while True:
        users = view.consumers.get(selected, [])
        if len(users) != 1 or users[0].op_type not in _SELECTIONS:
            break
        selected = users[0].output[0]
    if selected == norm.output[0]:
        raise OnnxcamError("LeGrad: the head does not pick a token (x[:, 0]) after the final LayerNorm; "
                           "only class-token heads are supported")
    ancestors, queue = set(), deque([logits])
    while queue:
        current = queue.popleft()
        producer = view.producer.get(current)
        if producer is None or id(producer) in ancestors:
            continue
        ancestors.add(id(producer))
        queue.extend(i for i in producer.input if i)
    reached, chain = {selected}, []
    for n in view.graph.node:
        if id(n) in ancestors and any(i in reached for i in n.input):
            chain.append(n)
            reached.update(o for o in n.output if o)
    return norm, selected, chain


def build_block_model(proto: onnx.ModelProto, block: Block, backend: str) -> onnx.ModelProto:
    """The gradient model of one block: outputs [projected logits, attention, d s_l / d attention]."""
    view = GraphView(proto)
    logits = find_logits(view)
    norm, selected, chain = _head(view, logits)
    model = copy_model(proto)
    b = GraphBuilder(view.names(), f"onnxcam_legrad/{block.scope}/", view.opset)
    renamed = {}
    mean = b.axes_op("ReduceMean", block.output, [1], keepdims=0)
    attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
    attrs["axis"] = -1
    renamed[selected] = b.op(norm.op_type, [mean, *norm.input[1:]], **attrs)
    for node in chain:
        outputs = [b.fresh(o.rsplit("/", 1)[-1] or "t") if o else "" for o in node.output]
        copy = helper.make_node(node.op_type, [renamed.get(i, i) for i in node.input], outputs,
                                name=b.fresh(node.op_type), domain=node.domain)
        copy.attribute.extend(node.attribute)
        b.nodes.append(copy)
        renamed.update({o: n for o, n in zip(node.output, outputs) if o})
    projected = renamed[logits]
    b.apply_to(model)
    add_target_head(model, projected, GraphView(model))
    set_outputs(model, [projected, block.attention], GraphView(model))
    model, _ = build_gradient_model(model, SCORE, [block.attention], backend)
    return model


class LeGradBlocks:
    """The explained blocks of an Explainer's nodes, their gradient models built on first use."""

    def __init__(self, model, nodes: list[NodeInfo], candidates: list[NodeInfo], backend: str,
                 provider: str, threads: int | None, probe: dict | None, digest: bytes | None = None):
        """``digest``: the model's cache digest (None: no cache, every block model is built)."""
        self.model, self.nodes, self.candidates = model, nodes, candidates
        self.backend, self.provider, self.threads, self.probe = backend, provider, threads, probe
        self.digest = digest
        self._blocks: list[Block] | None = None
        self._sessions: dict[int, Runner] = {}

    def blocks(self) -> list[Block]:
        if self._blocks is None:
            self._blocks = [find_block(self.model.view, node, self.candidates) for node in self.nodes]
            _head(self.model.view, find_logits(self.model.view))       # fails early without a head
        return self._blocks

    def gradients(self, i: int, x: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
        """d s_l / d attention (N, heads, queries, keys) for node i's block, s_l of class ``targets``."""
        if i not in self._sessions:
            block = self.blocks()[i]

            def build() -> onnx.ModelProto:
                return build_block_model(with_measured_shapes(self.model.proto, self.probe), block,
                                         self.backend)

            parts = {"family": "legrad", "block": [block.scope, block.output, block.attention],
                     "backend": self.backend, "training_runtime": ort_training_available(),
                     "probe": {k: list(v) for k, v in (self.probe or {}).items()}}
            data = cached_model_bytes(parts, self.digest, build)
            # outputs in the model's order: projected logits, attention, its gradient (build_block_model)
            self._sessions[i] = Runner(data, None, self.provider, self.threads)
        runner = self._sessions[i]
        weights = np.zeros((len(x), num_classes), np.float32)
        weights[np.arange(len(x)), targets] = 1.0
        _, attention, grad = runner.run({self.model.input.name: x, TARGET_WEIGHTS: weights})
        if grad.ndim == 3:   # (N·heads, queries, keys), as some exports keep it
            grad = grad.reshape(len(x), -1, *grad.shape[1:])
        return grad
