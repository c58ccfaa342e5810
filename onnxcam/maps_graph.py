"""The final maps computed inside the augmented model: one ``run`` returns what the user gets.

On top of the gradient model (logits, activations A, gradients G) this appends, per gradient method,
the same arithmetic as the NumPy engine (``methods.gradient_based`` + ``methods.postprocess``, which stay
the reference and which the tests compare with):

    layer map  = relu(Σ_C w·A)  or  relu(Σ_C f(G)·A)           (the method's formula, channels-first)
    per layer  : relu → (x − min) / (max + 1e-7) → bilinear resize to the input (half-pixel centres,
                 clamped at the border: what cv2.resize INTER_LINEAR does for float maps)
    fused      : relu → mean over layers → (x − min) / (max + 1e-7)

When the model fixes its input's spatial size and the node's is known, the bilinear resize is two
MatMuls with constant interpolation matrices (rows, then columns: the same two-tap weights, ~20x less
work than ONNX Resize at 7x7 -> 224x224), and the final normalisation is folded in front of the row
MatMul (``_Emitter.fused_static``: the input-sized maps are written once, not read four more times); otherwise the resize target is read from the input's own shape
(Shape → Gather → Resize), so one model serves every input size. The ReLUs of the reference that act
on maps already non-negative (a ReLU's output, a resize of one) are left out: they change nothing.
The session then returns only the logits, the final maps (N, H, W) and the small layer maps; on
CUDA (``runtime.Runner`` binds outputs through IO binding) nothing else crosses to the host.

Supported where this is exact: the five gradient methods, 2D spatial nodes whose layout (channels
first or last) is known when the model is built, opset ≥ 11 (Resize with half-pixel sizes). Everything
else (CAM, EigenCAM's SVD, Score-CAM, 1D/3D nodes) stays on the NumPy path.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from . import layouts
from .cache import cached_model_bytes
from .gradients import ort_training_available
from .graph import GraphBuilder, GraphView, attributes, copy_model, is_default_domain, without_unused
from .methods.gradient_based import GRADCAM_PLUS_PLUS_EPS, XGRADCAM_EPS
from .methods.interpolation import interpolation_matrix
from .methods.postprocess import NORMALIZE_EPS
from .runtime import Runner
from .surgery import TARGET_WEIGHTS, set_outputs

IN_GRAPH_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")
MAPS_ENGINES = ("auto", "graph", "numpy")
# Whether ``maps="auto"`` computes the gradient methods' maps in the graph. Set from tools/bench.py: the
# in-graph maps were as fast or faster than the NumPy engine at batch 1 and 32 on both bench nets.
GRAPH_MAPS_BY_DEFAULT = True
MIN_OPSET = 11
_SPATIAL = [2, 3]
_OWN_NODES = ("onnxcam_bw/", "onnxcam_head/", "onnxcam_maps/")   # GraphBuilder prefixes of the edits


def maps_output(method: str) -> str:
    return f"onnxcam_maps_{method}"


def layer_map_output(method: str, layer: int) -> str:
    return f"onnxcam_layer_map_{method}_{layer}"


def maps_output_names(logits: str, methods: Sequence[str], activations: Sequence[str],
                      expose_activations: bool) -> list[str]:
    """The outputs ``append_maps`` gives the model, in order (known without reading the model back)."""
    return [logits, *(maps_output(m) for m in methods),
            *(layer_map_output(m, i) for m in methods for i in range(len(activations))),
            *(activations if expose_activations else [])]


def supported(methods: Sequence[str], node_layouts: Sequence[str | None], opset: int) -> bool:
    """True when every method and node can be computed in the graph exactly."""
    return (opset >= MIN_OPSET and bool(methods) and all(m in IN_GRAPH_METHODS for m in methods)
            and all(layout in (layouts.FIRST, layouts.LAST) for layout in node_layouts))


def node_layout(shape: tuple | None, input_spatial: tuple | None, input_layout: str) -> str | None:
    """The layout of a 2D-spatial node known from static shapes (as the NumPy path reads it), else None."""
    if shape is None or input_spatial is None or len(shape) != 4 or len(input_spatial) != 2:
        return None
    if not all(isinstance(d, int) and d > 0 for d in (*shape[1:], *input_spatial)):
        return None
    return layouts.activation_layout(tuple(shape), tuple(input_spatial), input_layout)


class _Emitter:
    """The method formulas and the post-processing as ONNX nodes (float32, channels-first)."""

    def __init__(self, b: GraphBuilder, view: GraphView):
        self.b = b
        self.view = view
        self._made: dict[tuple, str] = {}

    def const(self, value: float) -> str:
        return self.b.initializer(np.array(value, np.float32), "c")

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        """One node, or the one already made with the same inputs and attributes: several methods share
        terms (G·A for HiResCAM and XGrad-CAM, relu(G) for LayerCAM and Grad-CAM++, Σ A)."""
        key = (op_type, tuple(inputs), tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key not in self._made:
            self._made[key] = self.b.op(op_type, inputs, **attrs)
        return self._made[key]

    def reduce(self, op: str, x: str, axes, keepdims: int) -> str:
        key = ("axes", op, x, tuple(axes), keepdims)
        if key not in self._made:
            self._made[key] = self.b.axes_op(op, x, axes, keepdims=keepdims)
        return self._made[key]

    def weighted(self, A: str, w: str) -> str:
        """relu(Σ_C w·A), w (N, C, 1, 1)."""
        return self.op("Relu", [self.reduce("ReduceSum", self.op("Mul", [w, A]), [1], 0)])

    def layer_map(self, method: str, A: str, G: str) -> str:
        op = self.op
        if method == "gradcam":
            return self.weighted(A, self.spatial_mean(G))
        if method == "hirescam":
            return op("Relu", [self.reduce("ReduceSum", op("Mul", [G, A]), [1], 0)])
        if method == "layercam":
            return op("Relu", [self.reduce("ReduceSum", op("Mul", [op("Relu", [G]), A]), [1], 0)])
        sum_a = self.reduce("ReduceSum", A, _SPATIAL, 1)
        if method == "xgradcam":
            share = op("Div", [op("Mul", [G, A]), op("Add", [sum_a, self.const(XGRADCAM_EPS)])])
            return self.weighted(A, self.reduce("ReduceSum", share, _SPATIAL, 1))
        if method == "gradcam++":
            g2 = op("Mul", [G, G])
            g3 = op("Mul", [g2, G])
            denominator = op("Add", [op("Add", [op("Mul", [self.const(2.0), g2]), op("Mul", [sum_a, g3])]),
                                     self.const(GRADCAM_PLUS_PLUS_EPS)])
            alpha = op("Div", [g2, denominator])
            alpha = op("Where", [op("Equal", [G, self.const(0.0)]), self.const(0.0), alpha])
            return self.weighted(A, self.reduce("ReduceSum", op("Mul", [op("Relu", [G]), alpha]), _SPATIAL, 1))
        raise ValueError(f"{method} has no in-graph form")

    def spatial_mean(self, G: str) -> str:
        """The mean of G over (H, W), (N, C, 1, 1), taken as early in G's backward chain as is exact
        (up to float rounding), so the full-size tensors after that point are pruned:

        - G a pointwise Conv of h (the backward of a 1x1 convolution, as after MobileNet/EfficientNet's
          last block): a per-pixel linear map, so mean(G) is that map of mean(h), one pixel instead of
          H·W (a Gemm: ONNX Runtime's Conv on a 1x1 plane pays for its blocked layout);
        - G = s · h with s constant over (H, W) (the pooled upstream gradient times a ReLU/ReLU6 mask):
          mean(G) = s · mean(h)."""
        view = self.view
        node = view.producer.get(G)
        while node is not None and node.op_type == "Identity" and is_default_domain(node):
            G, node = node.input[0], view.producer.get(node.input[0])
        conv = _pointwise_conv(node)
        if conv is not None:
            pooled = self.spatial_mean(conv.input[0])
            if attributes(conv).get("group", 1) != 1:
                return self.b.op("Conv", [pooled, *conv.input[1:]], **attributes(conv))
            b = self.b
            flat = b.op("Reshape", [pooled, b.ints([0, -1])])                       # (N, C_in)
            weights = b.op("Reshape", [conv.input[1], b.ints([0, -1])])             # (C_out, C_in)
            mean = b.op("Gemm", [flat, weights, *conv.input[2:3]], transB=1)        # (N, C_out)
            return b.op("Reshape", [mean, b.ints([0, -1, 1, 1])])
        if node is not None and node.op_type == "Mul" and is_default_domain(node) and view.rank(G) == 4:
            for k in (0, 1):
                scale, other = node.input[k], node.input[1 - k]
                if _constant_over_spatial(view, scale) and view.rank(other) == 4:
                    return self.b.op("Mul", [scale, self.spatial_mean(other)])
        return self.reduce("ReduceMean", G, _SPATIAL, 1)

    def normalize(self, maps: str) -> str:
        """Per sample (x − min) / (max + 1e-7) over (H, W), as postprocess.normalize."""
        shifted = self.b.op("Sub", [maps, self.reduce("ReduceMin", maps, [1, 2], 1)])
        top = self.b.op("Add", [self.reduce("ReduceMax", shifted, [1, 2], 1), self.const(NORMALIZE_EPS)])
        return self.b.op("Div", [shifted, top])

    def fused_static(self, layers: Sequence[str], sources: Sequence[tuple[int, int]],
                     target: tuple[int, int]) -> str:
        """normalize(mean over layers of resize(normalize(layer))) with known sizes, each resize being
        rows (H, h) @ maps @ columns (w, W), and the final normalisation moved in front of the rows:

        - its min and max are those of a few output rows and columns (``_extreme_lines``), computed
          from the same small products, instead of two passes over the (N, H, W) maps;
        - (mean_l R_l·U_l − min) / top = Σ_l R_l·((U_l − min) / (L·top)), since each row of R_l sums
          to 1 (up to float rounding), so the shift and scale act on the (N, h, W) products U_l and the
          maps are written once, by the last MatMul."""
        b, H, W = self.b, target[0], target[1]
        rows = [interpolation_matrix(h, H, align_corners=False) for h, _ in sources]
        columns = [interpolation_matrix(w, W, align_corners=False) for _, w in sources]
        keep_rows, keep_columns = _extreme_lines(rows), _extreme_lines(columns)
        products, corners = [], []
        for layer, R, C in zip(layers, rows, columns):
            normalized = self.normalize(layer)
            products.append(b.op("MatMul", [normalized, b.initializer(np.ascontiguousarray(C.T), "columns")]))
            few = b.op("MatMul", [normalized, b.initializer(np.ascontiguousarray(C[keep_columns].T), "columns")])
            corners.append(b.op("MatMul", [b.initializer(R[keep_rows], "rows"), few]))
        sample = corners[0] if len(corners) == 1 else self.reduce(
            "ReduceMean", b.op("Concat", [b.axes_op("Unsqueeze", c, [1]) for c in corners], axis=1), [1], 0)
        low = self.reduce("ReduceMin", sample, [1, 2], 1)
        top = b.op("Add", [self.reduce("ReduceMax", b.op("Sub", [sample, low]), [1, 2], 1),
                           self.const(NORMALIZE_EPS)])
        if len(layers) > 1:
            top = b.op("Mul", [top, self.const(float(len(layers)))])
        fused = None
        for product, R in zip(products, rows):
            scaled = b.op("Div", [b.op("Sub", [product, low]), top])
            resized = b.op("MatMul", [b.initializer(R, "rows"), scaled])
            fused = resized if fused is None else b.op("Add", [fused, resized])
        # the reference's maps lie in [0, 1]; the moved shift and scale can round them an ulp outside
        return b.op("Clip", [fused, self.const(0.0), self.const(1.0)])

    def resize_to(self, maps: str, size: str) -> str:
        """(N, h, w) → (N, H, W), bilinear with half-pixel centres; ``size`` = int64 [H, W]."""
        b = self.b
        planes = b.axes_op("Unsqueeze", maps, [1])                         # (N, 1, h, w)
        lead = b.op("Slice", [b.op("Shape", [planes]), b.ints([0]), b.ints([2])])
        sizes = b.op("Concat", [lead, size], axis=0)
        empty = b.initializer(np.zeros(0, np.float32), "empty")
        resized = b.op("Resize", [planes, empty, empty, sizes], mode="linear",
                       coordinate_transformation_mode="half_pixel")
        return b.axes_op("Squeeze", resized, [1])


def _extreme_lines(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """The output lines (rows of the interpolation matrices, one matrix per layer) where the resized
    maps' min and max lie. Group consecutive lines by the input lines they read in every layer: within
    a group each layer's two-tap weights are affine in the line's position, so the mean of the resized
    layers is too, and its extremes over the group are at the group's first or last line."""
    reads = [tuple(tuple(np.flatnonzero(m[i])) for m in matrices) for i in range(matrices[0].shape[0])]
    last = len(reads) - 1
    return np.array([i for i in range(len(reads))
                     if i in (0, last) or reads[i] != reads[i - 1] or reads[i] != reads[i + 1]], np.int64)


def _constant_over_spatial(view: GraphView, name: str) -> bool:
    """Whether ``name``, broadcast against a 4D (N, C, H, W) tensor, has one value over (H, W): its
    known dims aligned with H and W (numpy broadcasting aligns the trailing ones) are all 1."""
    shape = view.shape(name)
    return shape is not None and len(shape) <= 4 and all(d == 1 for d in shape[-2:])


def _pointwise_conv(node: onnx.NodeProto | None) -> onnx.NodeProto | None:
    """``node`` when it is a pointwise Conv (1x1 kernel, stride 1, no padding) on a 4D tensor, else None."""
    if node is None or node.op_type != "Conv" or not is_default_domain(node):
        return None
    a = attributes(node)
    kernel = a.get("kernel_shape")
    if kernel is None or list(kernel) != [1, 1]:
        return None
    if any(v != 1 for v in a.get("strides") or [1]) or any(v != 0 for v in a.get("pads") or [0]):
        return None
    return node if a.get("auto_pad", "NOTSET") in ("NOTSET", "", "VALID") else None


def gather_target_rows(proto: onnx.ModelProto, view: GraphView, logits: str) -> None:
    """Where the backward of a constant linear classifier (Gemm or MatMul) multiplies the score head's
    effective weights by the weight matrix, gather the target rows instead (in place).

    The maps models serve classifiers only (``GraphMaps.plan``), whose target weights are one-hot rows
    or zero rows that the head turns into the arg-max's one-hot (``targets.target_weights``): one-hot
    times a matrix is exactly its row, read in a few kilobytes instead of the whole matrix (the
    backward Gemm of EfficientNet's 1000 x 1280 classifier cost ~2 % of a forward pass at batch 1).
    The target index is read from the weights fed (a one-hot row) or the logits' arg-max (a zero row),
    which leaves the head's own one-hot arithmetic unused (pruned)."""
    nodes = []
    for node in proto.graph.node:
        nodes.append(node)
        if not node.name.startswith("onnxcam_bw/") or node.op_type not in ("Gemm", "MatMul"):
            continue
        head = view.producer.get(node.input[0])
        if head is None or head.op_type != "Add" or TARGET_WEIGHTS not in head.input \
                or not head.name.startswith("onnxcam_head/"):
            continue
        matrix, transposed = node.input[1], False
        if node.op_type == "Gemm":
            a = attributes(node)
            if len(node.input) > 2 or a.get("alpha", 1.0) != 1.0 or a.get("transA", 0):
                continue
            transposed = bool(a.get("transB", 0))
        else:                       # MatMul(g, Transpose(B)): the MatMul rule's form
            made = view.producer.get(matrix)
            if made is None or made.op_type != "Transpose" or attributes(made).get("perm", [1, 0]) != [1, 0]:
                continue
            matrix, transposed = made.input[0], True
        weights = view.initializers.get(matrix)
        if weights is None or len(weights.dims) != 2:
            continue
        b = GraphBuilder(view.names(), f"{node.name}/rows_", view.opset)
        given = b.op("Greater", [b.axes_op("ReduceMax", TARGET_WEIGHTS, [1], keepdims=0),
                                 b.initializer(np.array(0.0, np.float32), "zero")])
        target = b.op("Where", [given, b.op("ArgMax", [TARGET_WEIGHTS], axis=1, keepdims=0),
                                b.op("ArgMax", [logits], axis=1, keepdims=0)])
        if transposed:    # (N, K) @ Bᵀ with B (F, K): columns of B, then (N, F)
            b.op("Transpose", [b.op("Gather", [matrix, target], axis=1)], outputs=[node.output[0]], perm=[1, 0])
        else:
            b.op("Gather", [matrix, target], outputs=[node.output[0]], axis=0)
        nodes[-1:] = b.nodes            # the row lookup writes the product's name: its readers stay
        proto.graph.initializer.extend(b.initializers)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def append_maps(proto: onnx.ModelProto, input_name: str, input_layout: str, logits: str,
                activations: Sequence[str], gradients: Sequence[str], node_layouts: Sequence[str],
                methods: Sequence[str], expose_activations: bool = False,
                layer_sizes: Sequence[tuple[int, int] | None] | None = None,
                input_size: tuple[int, int] | None = None) -> list[str]:
    """Append the maps of ``methods`` to the gradient model ``proto`` (in place) and make its outputs
    [logits, maps per method, layer maps per method and node] (then the activations, as the model gives
    them, when ``expose_activations``: for methods computed on the host from the same run); returns
    those output names. ``layer_sizes`` (each node's (h, w), channels-first) and ``input_size`` (H, W),
    when known before the model runs, let the resize be constant MatMuls."""
    view = GraphView(proto)
    gather_target_rows(proto, view, logits)
    view = GraphView(proto)
    b = GraphBuilder(view.names(), "onnxcam_maps/", view.opset)
    e = _Emitter(b, view)
    spatial = [2, 3] if input_layout == layouts.FIRST else [1, 2]
    size = b.op("Gather", [b.op("Shape", [input_name]), b.ints(spatial)], axis=0)
    first = []
    for A, G, layout in zip(activations, gradients, node_layouts):
        if layout == layouts.LAST:
            A, G = (b.op("Transpose", [t], perm=[0, 3, 1, 2]) for t in (A, G))
        first.append((A, G))
    layer_sizes = list(layer_sizes or [None] * len(first))
    outputs, layer_outputs = [], []
    static = input_size is not None and all(s is not None for s in layer_sizes)
    for method in methods:
        layers = []
        for i, (A, G) in enumerate(first):
            layer = e.layer_map(method, A, G)        # ends in a ReLU: the reference's next one is a no-op
            layer_outputs.append(b.op("Identity", [layer], outputs=[b.reserve(layer_map_output(method, i))]))
            layers.append(layer)
        # bilinear weights are non-negative: the resized maps are too, and the reference's ReLU is a no-op
        if static:
            final = e.fused_static(layers, layer_sizes, input_size)
        else:
            resized = [e.resize_to(e.normalize(layer), size) for layer in layers]
            fused = resized[0] if len(resized) == 1 else e.reduce("ReduceMean", b.op(
                "Concat", [b.axes_op("Unsqueeze", r, [1]) for r in resized], axis=1), [1], 0)
            final = e.normalize(fused)
        outputs.append(b.op("Identity", [final], outputs=[b.reserve(maps_output(method))]))
    b.apply_to(proto)
    names = maps_output_names(logits, methods, activations, expose_activations)
    assert names[1:1 + len(outputs) + len(layer_outputs)] == outputs + layer_outputs
    set_outputs(proto, names, view)
    # what only the dropped outputs needed (the gradients themselves when a method reads just their
    # mean, the score): onnxcam's own nodes that nothing reads any more
    kept = without_unused(list(proto.graph.node), set(names), lambda node: node.name.startswith(_OWN_NODES))
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return names


class GraphMaps:
    """The sessions with in-graph maps of one Explainer: which batches can use them, and the models,
    cached on disk like the gradient model (one per methods, node layouts and outputs)."""

    def __init__(self, explainer):
        self.explainer = explainer
        self.sessions: dict[tuple, tuple[list[str], Runner]] = {}
        self._plans: dict[tuple, tuple | None] = {}

    def plan(self, specs, x) -> tuple | None:
        """(methods computed in the graph, node layouts, whether the other methods need the
        activations too) when this batch's gradient maps can come out of the session, else None.
        Decided once per list of methods and input shape (past the batch): every call asks."""
        key = (tuple(spec.name for spec in specs), x.shape[1:])
        if key not in self._plans:
            self._plans[key] = self._plan(specs, x)
        return self._plans[key]

    def _plan(self, specs, x) -> tuple | None:
        e = self.explainer
        if e.maps == "numpy" or (e.maps == "auto" and not GRAPH_MAPS_BY_DEFAULT):
            return None
        # the in-graph maps read (N, K) logits of a model run whole: not for other output shapes, other
        # inputs, fixed batches or a gradient model specialised to this batch's shape
        if not e.scored_output(x).is_classifier or e.feeds.arrays or e.feeds.fixed_batch is not None:
            return None
        if e.model.input.elem_type != onnx.TensorProto.FLOAT:   # float16/double models: NumPy maps
            return None
        if not any(spec.name in IN_GRAPH_METHODS for spec in specs):
            return None
        # only on the generic portable gradient model: onnxruntime-training 1.19.2 crashes (segfault) when
        # it creates a session for its own gradient graph with the maps appended
        if e.gradients.generic_backend() != "portable":
            return None
        names = tuple(spec.name for spec in specs if spec.name in IN_GRAPH_METHODS)
        spatial = e.input_spatial(x)
        node_layouts = tuple(node_layout(node.shape, spatial, e.input_layout) for node in e.nodes)
        if not supported(names, node_layouts, e.model.opset):
            return None
        return names, node_layouts, len(names) < len(specs)

    def session(self, methods: tuple[str, ...], node_layouts: tuple[str, ...],
                with_activations: bool = False) -> tuple[list[str], Runner]:
        """The gradient model with the final maps of ``methods`` appended, and its session."""
        key = (methods, node_layouts, with_activations)
        if key not in self.sessions:
            e = self.explainer

            def build() -> onnx.ModelProto:
                gradient = e.augmented_gradient_model()
                proto = copy_model(gradient.proto)
                append_maps(proto, gradient.input_name, e.input_layout, gradient.logits, gradient.activations,
                            gradient.gradients, node_layouts, methods, expose_activations=with_activations,
                            layer_sizes=layer_sizes, input_size=input_size)
                return proto

            layer_sizes, input_size = self.static_sizes(node_layouts)

            parts = {"family": "maps", "nodes": e.tensors, "backend": e.grad_backend,
                     "probabilities": e.probabilities, "output": e.output,
                     "training_runtime": ort_training_available(),
                     "methods": list(methods), "layouts": list(node_layouts), "input_layout": e.input_layout,
                     "activations": with_activations, "layer_sizes": layer_sizes, "input_size": input_size}
            data = cached_model_bytes(parts, e._digest, build) if e.cache and e._digest else build()
            names = maps_output_names(e.logits_name, methods, e.tensors, with_activations)
            self.sessions[key] = (names, Runner(data, names, e.provider, e.threads))
        return self.sessions[key]

    def static_sizes(self, node_layouts: Sequence[str]) -> tuple[list, tuple[int, int] | None]:
        """Each node's spatial (h, w) and the input's (H, W), where the model fixes them (else None)."""
        e = self.explainer

        def fixed(dims) -> tuple[int, int] | None:
            dims = tuple(dims)
            return dims if len(dims) == 2 and all(isinstance(d, int) and d > 0 for d in dims) else None

        shape = e.model.input.shape
        spatial = [2, 3] if e.input_layout == layouts.FIRST else [1, 2]
        input_size = fixed(shape[a] for a in spatial) if shape is not None and len(shape) == 4 else None
        layer_sizes = [fixed(node.shape[2:] if layout == layouts.FIRST else node.shape[1:3])
                       if node.shape is not None and len(node.shape) == 4 else None
                       for node, layout in zip(e.nodes, node_layouts)]
        return layer_sizes, input_size
