"""One read-only view of an ONNX model, and one builder for the graph edits onnxcam makes.

Every module that reads a graph (node listing, the CAM classifier walk, surgery, both gradient
backends, canonicalisation, the Score-CAM graph) asks a ``GraphView``: producers and consumers, the
default opset, tensor types and shapes from ONE shape inference, and the values of constant tensors
(initializers, Constant nodes, Identity of constants, small all-constant subgraphs folded on demand).
Every module that edits a graph takes its fresh names and constants from a ``GraphBuilder``, so no two
edits can collide on a name and no module keeps its own naming scheme.

Shape inference runs on a copy of the graph whose large initializers keep only their type and dims
(shape inference needs no more, and copying a ResNet-50's weights made it 20x slower), with data
propagation so that shapes computed by Shape -> Gather -> Concat chains are known where ONNX can tell.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import OnnxcamError
from .opsets import axes_are_input

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
DEFAULT_DOMAINS = ("", "ai.onnx")
SMALL_CONSTANT_ELEMENTS = 1024   # initializers kept whole for shape inference (shape-like data)
FOLD_LIMIT = 4096                # elements: fold shape/pad arithmetic, never weight transforms
NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                "Bernoulli", "If", "Loop", "Scan"}

Dim = int | str | None
Shape = list[Dim] | None


def default_opset(proto: onnx.ModelProto) -> int:
    """The opset version of the default ONNX domain."""
    for entry in proto.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    raise OnnxcamError("the model imports no default ONNX opset; it is not a standard ONNX model")


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def attribute(node: onnx.NodeProto, name: str, default=None):
    """One attribute's Python value (strings decoded), or ``default`` when the node lacks it."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def attributes(node: onnx.NodeProto) -> dict:
    """Every attribute of the node as Python values (strings decoded, lists, tensors)."""
    return {a.name: attribute(node, a.name) for a in node.attribute}


def type_dims(type_proto: onnx.TypeProto) -> tuple[int, Shape]:
    """(element type or 0, dims) of a tensor type; a dim is an int, a symbol (str) or None."""
    if not type_proto.HasField("tensor_type"):
        return 0, None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    return tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                   for d in tensor_type.shape.dim]


def copy_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)
    return clone


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors a node's subgraphs (If/Loop/Scan bodies) read implicitly."""
    names = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            local = {i.name for i in sub.input} | {i.name for i in sub.initializer}
            for n in sub.node:
                names.update(i for i in list(n.input) + list(subgraph_inputs(n)) if i and i not in local)
                local.update(n.output)
    return names


# Inputs that give sizes, pads or axes: shape inference reads their values only from initializers and
# Constant nodes, so one such input an exporter computes from constants (the "static padding" chain of
# PyTorch EfficientNet exports: Constant -> ConcatFromSequence/Reshape/Slice/Transpose -> Cast -> Pad)
# leaves every size after it unknown.
SHAPE_INPUTS = {"Pad": (1, 3), "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4),
                "Resize": (2, 3), "Upsample": (1,), "ConstantOfShape": (0,), "Unsqueeze": (1,),
                "Squeeze": (1,), "Range": (0, 1, 2), "OneHot": (1,), "TopK": (1,),
                **{op: (1,) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                       "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")}}


def static_dims(dims) -> tuple | None:
    """``dims`` (ints, symbols, None) with every dim that is not a known positive int as None."""
    return None if dims is None else tuple(d if isinstance(d, int) and d > 0 else None for d in dims)


def _without_weight_data(model: onnx.ModelProto, folded: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A light copy for shape inference: large initializers without their data, and the ``folded``
    constant values of computed shape inputs as initializers."""
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                            functions=model.functions)
    graph = light.graph
    for name in ("node", "input", "output", "value_info"):
        getattr(graph, name).extend(getattr(model.graph, name))
    for node in graph.node:   # onnxruntime's com.microsoft Q/DQ infer like the standard ops
        if node.domain == "com.microsoft" and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.domain = ""
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) > SMALL_CONSTANT_ELEMENTS:
            init = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
        graph.initializer.append(init)
    for name, value in (folded or {}).items():
        graph.initializer.append(numpy_helper.from_array(value, name))
    return light


class GraphView:
    """What onnxcam needs to know about one model's top-level graph, computed once and then read.

    The view never changes the proto. Build a new view after editing a graph."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        graph = proto.graph
        self.graph = graph
        self.opset = default_opset(proto)
        self.producer: dict[str, onnx.NodeProto] = {out: n for n in graph.node for out in n.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(i for i in node.input if i):
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.input_names = [vi.name for vi in graph.input if vi.name not in self.initializers]
        self.output_names = [vi.name for vi in graph.output]
        self._value_infos: dict[str, onnx.ValueInfoProto] | None = None
        self._constant_sources: set[str] | None = None
        self._constants: dict[str, np.ndarray | None] = {}

    # ---- types and shapes ----------------------------------------------------------------------
    @property
    def value_infos(self) -> dict[str, onnx.ValueInfoProto]:
        """Declared and inferred value infos of every tensor shape inference could type."""
        if self._value_infos is None:
            graph = self.graph
            declared = {vi.name: vi for vi in itertools.chain(graph.input, graph.value_info, graph.output)}
            try:
                inferred = onnx.shape_inference.infer_shapes(
                    _without_weight_data(self.proto, self._folded_shape_inputs()), check_type=False,
                    strict_mode=False, data_prop=True).graph
                found = {vi.name: vi for vi in itertools.chain(inferred.input, inferred.value_info,
                                                               inferred.output)}
            except Exception:   # inference is a help, never a requirement: callers probe or say why
                found = {}
            for name, vi in declared.items():   # what the exporter declared wins where inference lost it
                if name not in found or type_dims(found[name].type)[1] is None:
                    found[name] = vi
            self._value_infos = found
        return self._value_infos

    def _folded_shape_inputs(self) -> dict[str, np.ndarray]:
        """Values of the shape inputs (SHAPE_INPUTS) the graph computes from constants alone, folded
        before any shape is known (the Shape-of-a-static-tensor rule of ``_sources`` needs shapes)."""
        self._constant_sources = self._sources(with_shapes=False)
        try:
            folded = {}
            for node in self.graph.node:
                if not is_default_domain(node):
                    continue
                for k in SHAPE_INPUTS.get(node.op_type, ()):
                    name = node.input[k] if k < len(node.input) else ""
                    if not name or name in self.initializers or name in folded:
                        continue
                    made = self.producer.get(name)
                    if made is None or made.op_type == "Constant":   # inference reads those itself
                        continue
                    value = self.constant(name)
                    if isinstance(value, np.ndarray) and value.dtype != object:
                        folded[name] = value
            return folded
        finally:
            self._constant_sources = None      # with shapes known, more tensors may be constant

    def type_of(self, name: str) -> tuple[int, Shape]:
        """(element type or 0, dims or None) of a tensor; initializers from their own dims."""
        if name in self.initializers:
            init = self.initializers[name]
            return init.data_type, list(init.dims)
        info = self.value_infos.get(name)
        return type_dims(info.type) if info is not None else (0, None)

    def elem_type(self, name: str) -> int:
        return self.type_of(name)[0]

    def shape(self, name: str) -> Shape:
        """Dims of a tensor (int, symbol or None), or None when even the rank is unknown."""
        return self.type_of(name)[1]

    def static_shape(self, name: str) -> tuple | None:
        """The shape with every dim that is not a known positive int as None."""
        return static_dims(self.shape(name))

    def rank(self, name: str) -> int | None:
        dims = self.shape(name)
        return None if dims is None else len(dims)

    def types(self) -> dict[str, tuple[int, Shape]]:
        """Every typed tensor's (element type, dims), for builders that add tensors of their own."""
        out = {name: type_dims(vi.type) for name, vi in self.value_infos.items()}
        out.update({name: self.type_of(name) for name in self.initializers})
        return out

    # ---- constants ---------------------------------------------------------------------------
    def _sources(self, with_shapes: bool = True) -> set[str]:
        """Tensors whose value is fixed by the graph alone (computed in one pass, graph order);
        ``with_shapes``: also Shape/Size of tensors whose shape inference fixes (runs it)."""
        if self._constant_sources is not None and with_shapes:
            return self._constant_sources
        overridable = {vi.name for vi in self.graph.input}   # an initializer that is also an input
        fixed = {name for name in self.initializers if name not in overridable}
        for node in self.graph.node:
            inputs = [i for i in node.input if i]
            if not is_default_domain(node) or node.op_type in NOT_FOLDABLE:
                continue
            if node.op_type == "Constant" or (inputs and all(i in fixed for i in inputs)) \
                    or (with_shapes and node.op_type in ("Shape", "Size") and self._fully_static(node.input[0])):
                fixed.update(o for o in node.output if o)
        if with_shapes:
            self._constant_sources = fixed
        return fixed

    def _fully_static(self, name: str) -> bool:
        shape = self.static_shape(name)
        return shape is not None and all(d is not None for d in shape)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None: initializers (not overridable inputs), Constant
        nodes, Identity of a constant, and small all-constant subgraphs (exporters leave pad and
        slice arithmetic unfolded), evaluated with onnx.reference on first use."""
        if not name or name not in self._sources():
            return None
        if name not in self._constants:
            self._constants[name] = self._evaluate(name)
        return self._constants[name]

    def constant_ints(self, name: str) -> list[int] | None:
        value = self.constant(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    def _evaluate(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer[name]
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type == "Identity":
            return self.constant(node.input[0])
        if node.op_type == "Size":
            return np.array(int(np.prod(self.static_shape(node.input[0]))), np.int64)
        if node.op_type == "Shape":   # of a tensor whose shape is known (a model specialised to a batch)
            dims = np.array(self.static_shape(node.input[0]), np.int64)
            start, end = attribute(node, "start", 0), attribute(node, "end", None)
            return dims[start:end]
        values = {i: self.constant(i) for i in node.input if i}
        if any(v is None or v.size > FOLD_LIMIT for v in values.values()):
            return None
        from onnx.reference import ReferenceEvaluator
        try:
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, values)
        except Exception:   # folding is a help for the readers; the tensor just stays unknown
            return None
        for out, value in zip(node.output, results):
            if out and out != name and out not in self._constants:
                self._constants[out] = value if isinstance(value, np.ndarray) and value.size <= FOLD_LIMIT \
                    else None
        value = results[list(node.output).index(name)]
        return value if isinstance(value, np.ndarray) and value.size <= FOLD_LIMIT else None

    def ancestors(self, name: str) -> set[str]:
        """Every tensor ``name`` depends on, itself included (walked back through producers)."""
        seen, todo = {name}, [name]
        while todo:
            node = self.producer.get(todo.pop())
            if node is None:
                continue
            for source in list(node.input) + sorted(subgraph_inputs(node)):
                if source and source not in seen:
                    seen.add(source)
                    todo.append(source)
        return seen

    # ---- names ---------------------------------------------------------------------------------
    def names(self) -> set[str]:
        """Every name the graph uses (tensors, nodes, initializers, value infos)."""
        graph = self.graph
        names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info)}
        names |= set(self.initializers)
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
            if node.name:
                names.add(node.name)
        return names


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    if not node.attribute:
        return None
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
        return np.array(helper.get_attribute_value(a))
    return None


def view_of(model) -> GraphView:
    """The view of a GraphView, a LoadedModel (its own, built once) or a bare ModelProto (built now)."""
    if isinstance(model, GraphView):
        return model
    if isinstance(model, onnx.ModelProto):
        return GraphView(model)
    return model.view


def without_unused(nodes: list[onnx.NodeProto], needed: set[str],
                   removable=lambda node: True) -> list[onnx.NodeProto]:
    """``nodes`` (in order) less the ``removable`` ones whose outputs nothing in ``needed`` (the graph
    outputs) or a kept node reads. ONNX Runtime runs unused nodes too, so an edit that leaves some
    behind (an Expand a broadcast made unnecessary) prunes them."""
    needed = set(needed)
    kept = []
    for node in reversed(nodes):
        if removable(node) and not any(o in needed for o in node.output if o):
            continue
        kept.append(node)
        needed.update(i for i in node.input if i)
        needed.update(subgraph_inputs(node))
    return kept[::-1]


class GraphBuilder:
    """Fresh names, constants and nodes for one edit of one graph.

    ``taken`` holds every name already in use (``GraphView.names()``); each name handed out is added to
    it. Constants go in as initializers (``initializer``) or as Constant nodes (``constant``, for graphs
    whose initializer list must stay as it is); equal constants are emitted once."""

    def __init__(self, taken: set[str], prefix: str, opset: int):
        self.taken = taken
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = itertools.count(1)
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{self.prefix}{next(self._count)}_{hint}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def reserve(self, name: str) -> str:
        """Claim a fixed, documented name (a public input or output of an augmented model)."""
        if name in self.taken:
            raise OnnxcamError(f"the model already has a tensor named {name!r}, which onnxcam needs for "
                               "its own; rename that tensor in the model")
        self.taken.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outputs: list[str] | None = None,
           **attrs):
        """Append one node; return its output name (or the list of names when it has several)."""
        name = self.fresh(op_type)
        if outputs is None:
            outputs = [f"{name}:{i}" for i in range(n_out)]
            self.taken.update(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def _key(self, value: np.ndarray, kind: str) -> tuple:
        return (kind, value.dtype.str, value.shape, value.tobytes())

    def initializer(self, value, hint: str = "const") -> str:
        value = np.asarray(value)
        key = self._key(value, "init")
        if key not in self._constants:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(value, name))
            self._constants[key] = name
        return self._constants[key]

    def constant(self, value, hint: str = "Constant") -> str:
        value = np.asarray(value)
        key = self._key(value, "node")
        if key not in self._constants:
            name = self.fresh(hint)
            self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_node",
                                               value=numpy_helper.from_array(value, name)))
            self._constants[key] = name
        return self._constants[key]

    def ints(self, values, hint: str = "ints") -> str:
        return self.initializer(np.asarray(values, dtype=np.int64).reshape(-1), hint)

    def axes_op(self, op_type: str, data: str, axes, outputs: list[str] | None = None, **attrs) -> str:
        """``op_type(data)`` over ``axes``, written the way this opset wants (attribute or input)."""
        axes = [int(a) for a in axes]
        if axes_are_input(op_type, self.opset):
            return self.op(op_type, [data, self.ints(axes)], outputs=outputs, **attrs)
        return self.op(op_type, [data], outputs=outputs, axes=axes, **attrs)

    def apply_to(self, proto: onnx.ModelProto, prologue: bool = False) -> None:
        """Add the built nodes (after the graph's own, or before them) and initializers to ``proto``."""
        graph = proto.graph
        if prologue:
            original = list(graph.node)
            del graph.node[:]
            graph.node.extend(self.nodes + original)
        else:
            graph.node.extend(self.nodes)
        graph.initializer.extend(self.initializers)
        self.nodes, self.initializers = [], []
