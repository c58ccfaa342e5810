"""Which nodes can be explained, and which one the user means by ``--node``.

A candidate is a node whose first output is a float tensor of rank 3 to 5 (N,C,L / N,C,H,W /
N,C,D,H,W or channels-last). Shapes come from ONNX shape inference; when that leaves a layer's
shape unknown, one run of the model on zeros measures them.

Scopes are module paths, read from what exporters write:

- torch legacy (TorchScript) exporter: node names are the module path plus an op name,
  ``/layer4/layer4.1/relu_1/Relu`` → scope ``layer4/layer4.1/relu_1`` (``relu_1`` is the second call
  of module ``relu``).
- torch dynamo exporter (torch 2.13): node names are flat (``node_relu_4``); each node carries
  ``metadata_props["pkg.torch.onnx.name_scopes"]``, the Python repr of a list whose first item is
  ``''`` (the root module), then the fully qualified module names, then the FX node name:
  ``"['', 'layer4', 'layer4.1', 'layer4.1.relu', 'relu_4']"`` → scope ``layer4/layer4.1/layer4.1.relu``.
- tf2onnx (Keras): node names are TF name scopes, ``functional_1/mobilenetv2_1.00_160_1/out_relu_1/Relu6``
  → scope ``functional_1/mobilenetv2_1.00_160_1/out_relu_1``; Keras 3 appends ``_1`` to layer scopes.
"""
from __future__ import annotations

import ast
import difflib
import itertools
import re
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .errors import OnnxcamError, shape_text
from .graph import GraphView, attribute, view_of
from .runtime import probe_shapes

DYNAMO_SCOPES_KEY = "pkg.torch.onnx.name_scopes"

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCE_POOLS = {"ReduceMean", "ReduceMax"}
_WINDOW_POOLS = {"AveragePool", "MaxPool", "LpPool"}
# Ops between a layer and the global pool that change nothing a user would pick a layer for. Transpose
# is kept: in tf2onnx exports it gives the Keras layer's own (channels-last) output, as `--node out_relu` does.
_TRIVIA = {"Identity", "Dropout", "Cast"}
_NOT_LAYERS = {"Constant", "ConstantOfShape"}


@dataclass(frozen=True)
class NodeInfo:
    name: str                      # node name ("" for an unnamed node; `tensor` is always unique)
    op_type: str
    tensor: str                    # first output tensor
    shape: tuple | None            # int, or None for a symbolic dim (the batch); None when rank unknown
    scope: str                     # module path, components joined by "/"; "" at the root
    index: int                     # position in graph.node
    spatial: bool                  # float rank 3-5 with spatial axes > 1
    reaches_output: bool = True    # the model's first output depends on it


# ---------------------------------------------------------------- listing


def list_candidates(model, probe_input_shapes: dict[str, tuple] | None = None) -> list[NodeInfo]:
    """Every node whose first output is a float tensor of rank 3-5, in graph order.

    ``model``: a GraphView, LoadedModel or ModelProto."""
    view = view_of(model)
    model = view.proto
    types = _known_types(view)
    unknown = [node.output[0] for node in _layer_nodes(model) if _needs_probe(types.get(node.output[0]))]
    if unknown:
        symbolic_batch = _has_symbolic_batch(model)
        for tensor, (elem_type, shape) in probe_shapes(model, unknown, probe_input_shapes).items():
            inferred = types.get(tensor, (None, None))[1]
            if symbolic_batch and inferred is not None and len(inferred) == len(shape) and inferred[0] is None:
                shape = (None,) + shape[1:]  # the batch stays symbolic, as in the shapes inference knew
            types[tensor] = (elem_type, shape)
    upstream = view.ancestors(view.output_names[0]) if view.output_names else set()
    candidates = []
    for index, node in enumerate(model.graph.node):
        if node.op_type in _NOT_LAYERS or not node.output or not node.output[0]:
            continue
        elem_type, shape = types.get(node.output[0], (None, None))
        if elem_type not in _FLOAT_TYPES or shape is None or not 3 <= len(shape) <= 5:
            continue
        candidates.append(NodeInfo(name=node.name, op_type=node.op_type, tensor=node.output[0],
                                   shape=shape, scope="/".join(node_scope(node)), index=index,
                                   spatial=has_spatial_axes(shape),
                                   reaches_output=node.output[0] in upstream))
    return candidates


def has_spatial_axes(shape: tuple | None) -> bool:
    """True when the tensor still has a map to show, read channels-first AND channels-last.

    (1, 512, 7, 7) and (1, 7, 7, 1280) qualify; a pooled (1, 512, 1, 1) or (1, 1, 1, 1280) does not.
    Unknown dims count as larger than 1.
    """
    if shape is None or not 3 <= len(shape) <= 5:
        return False

    def some_axis_above_one(dims):
        return any(d is None or d > 1 for d in dims)
    return some_axis_above_one(shape[2:]) and some_axis_above_one(shape[1:-1])


def node_scope(node: onnx.NodeProto) -> list[str]:
    """The module path of a node: dynamo's name_scopes metadata when present, else its name's folders."""
    for prop in node.metadata_props:
        if prop.key == DYNAMO_SCOPES_KEY:
            scopes = _parse_dynamo_scopes(prop.value)
            if scopes is not None:
                return scopes
    return [part for part in node.name.split("/") if part][:-1]


def _parse_dynamo_scopes(value: str) -> list[str] | None:
    try:
        items = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        return None
    return [item for item in items[:-1] if item]  # drop the root '' and the trailing FX node name


def _has_symbolic_batch(model: onnx.ModelProto) -> bool:
    for value_info in model.graph.input:
        dims = value_info.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            return True
    return False


def _layer_nodes(model: onnx.ModelProto):
    return [node for node in model.graph.node
            if node.op_type not in _NOT_LAYERS and node.output and node.output[0]]


def _known_types(view: GraphView) -> dict[str, tuple]:
    """tensor name → (elem_type or None, shape with None for symbolic dims, or None)."""
    return {name: (elem or None, view.static_shape(name)) for name, (elem, _) in view.types().items()}


def _needs_probe(known: tuple | None) -> bool:
    """Could be a candidate but its type, rank or a non-batch dim is unknown."""
    if known is None:
        return True
    elem_type, shape = known
    if elem_type is not None and elem_type not in _FLOAT_TYPES:
        return False
    if elem_type is None or shape is None:
        return True
    return 3 <= len(shape) <= 5 and any(dim is None for dim in shape[1:])


# ---------------------------------------------------------------- default node


def default_node(candidates: list[NodeInfo], model, output: str | None = None) -> NodeInfo:
    """The layer feeding the model's last global pooling (pytorch-grad-cam's usual choice: ResNet
    ``layer4[-1]``), looking through Identity/Dropout/Cast; else the last spatial candidate. Only
    candidates that feed the scored ``output`` (default: the first) count, and among those, ones whose
    spatial axes follow the input's (same rank, no axis of size 1) are preferred. On a transformer:
    the last block's first LayerNorm output (see tokens.default_transformer_node)."""
    view = view_of(model)
    upstream = view.ancestors(output or view.output_names[0])
    feeding = [c for c in candidates if c.tensor in upstream]
    from .tokens import default_transformer_node
    transformer = default_transformer_node(feeding or candidates, view)
    if transformer is not None:
        return transformer
    candidates = _prefer_input_like(feeding or candidates, view)
    by_tensor = {candidate.tensor: candidate for candidate in candidates}
    producers = view.producer
    pooled = [node.input[0] for node in view.graph.node
              if node.input and _is_global_pool(node, by_tensor, view)]
    if pooled:
        tensor = pooled[-1]
        while tensor in producers and producers[tensor].op_type in _TRIVIA and producers[tensor].input:
            tensor = producers[tensor].input[0]
        if tensor in by_tensor and by_tensor[tensor].spatial:
            return by_tensor[tensor]
    spatial = [candidate for candidate in candidates if candidate.spatial]
    if not spatial:
        raise OnnxcamError("the model has no node with a spatial output (rank 3-5 float with spatial axes "
                           "larger than 1), so there is no map to explain")
    return spatial[-1]


def _prefer_input_like(candidates: list[NodeInfo], view: GraphView) -> list[NodeInfo]:
    """The candidates with the input's rank and no spatial axis of size 1 (not a pooled stripe or a
    token axis of a different rank), when there are any."""
    ranks = {view.rank(name) for name in view.input_names} - {None}
    like = [c for c in candidates if c.shape is not None and (not ranks or len(c.shape) in ranks)
            and all(d is None or d > 1 for d in c.shape[2:-1] or c.shape[2:])]
    return like or candidates


def _is_global_pool(node: onnx.NodeProto, by_tensor: dict[str, NodeInfo], view: GraphView) -> bool:
    source = by_tensor.get(node.input[0])
    if node.op_type in _GLOBAL_POOLS:
        return True
    if source is None or not source.spatial:
        return False
    if node.op_type == "Flatten":
        return True
    output = by_tensor.get(node.output[0]) if node.output else None
    if node.op_type in _WINDOW_POOLS:  # a pool window as large as the map, as old exports write it
        return output is not None and not output.spatial
    if node.op_type in _REDUCE_POOLS:
        axes = _reduce_axes(node, view)
        if axes is None:
            return output is not None and not output.spatial
        rank = len(source.shape)
        axes = {axis % rank for axis in axes}
        return axes in ({*range(2, rank)}, {*range(1, rank - 1)})
    return False


def _reduce_axes(node: onnx.NodeProto, view: GraphView) -> list[int] | None:
    axes = attribute(node, "axes")
    if axes is not None:
        return list(axes)
    if len(node.input) > 1 and node.input[1]:
        return view.constant_ints(node.input[1])
    return None


# ---------------------------------------------------------------- resolving --node


def resolve_node(model, spec: str, candidates: list[NodeInfo], output: str | None = None) -> NodeInfo:
    """The node a user means by ``spec``; exact names beat module scopes (see module docstring).

    Accepted, in this order of preference: ``auto``; a node name; an output tensor name (``:0`` may be
    left off); a module scope (``layer4``, ``/layer4``, ``layer4.1``, ``layer4.1.relu``) meaning its last
    spatial node; a scope plus an op type or op name (``/layer4/Relu``: the last Relu inside layer4;
    ``Relu`` alone: the last Relu of the graph); a torch module whose parameters feed a node
    (``_conv_head`` for weight ``_conv_head.weight``); last, a Keras layer ``out_relu`` for scope ``out_relu_1``.
    """
    spec = spec.strip()
    view = view_of(model)
    if spec.lower() == "auto":
        return default_node(candidates, view, output)
    nodes = list(view.graph.node)
    by_tensor = {candidate.tensor: candidate for candidate in candidates}
    for exact in ((node for node in nodes if node.name == spec),
                  (node for node in nodes if node.output and node.output[0] == spec),
                  (node for node in nodes if node.output and node.output[0] == f"{spec}:0")):
        found = list(exact)
        if found:
            return _spatial_or_error(found[-1], by_tensor, view)
    parts = [part for part in spec.split("/") if part]
    if parts:
        # exact spellings before Keras-style `_1` suffixes; paths from the root before nested ones
        searches = [lambda: _nodes_in_scope(nodes, parts, True, False, False),
                    lambda: _nodes_in_scope(nodes, parts, True, False, True),
                    lambda: _nodes_in_scope(nodes, parts, False, False, False),
                    lambda: _nodes_in_scope(nodes, parts, False, False, True),
                    lambda: _nodes_using_parameters_of(view, nodes, ".".join(parts))]
        searches += [lambda anchored=anchored, with_op=with_op: _nodes_in_scope(nodes, parts, anchored, True, with_op)
                     for anchored, with_op in itertools.product((True, False), (False, True))]
        for search in searches:
            inside = search()
            if inside:
                spatial = [by_tensor[node.output[0]] for node in inside
                           if node.output[0] in by_tensor and by_tensor[node.output[0]].spatial]
                return spatial[-1] if spatial else _spatial_or_error(inside[-1], by_tensor, view)
    raise OnnxcamError(_unknown_spec_message(spec, candidates))


def _nodes_in_scope(nodes, parts: list[str], anchored: bool, loose: bool, with_op: bool) -> list[onnx.NodeProto]:
    """Nodes whose scope contains ``parts`` as whole consecutive components (with_op: all but the last
    part, the last one naming the op type or the op's own name, e.g. ``Relu``). ``anchored`` asks the
    first part to start the path (``conv1`` is the root's conv1, not every block's); ``loose`` lets
    ``out_relu`` match the ``out_relu_1`` that Keras 3 writes (and torch, for a module's second call)."""
    scope_parts, op = (parts[:-1], parts[-1]) if with_op else (parts, None)
    found = []
    for node in nodes:
        if not node.output or not node.output[0] or node.op_type in _NOT_LAYERS:
            continue
        if op is not None and op not in (node.op_type, node.name.rsplit("/", 1)[-1]):
            continue
        if _scope_contains(node_scope(node), scope_parts, anchored, loose):
            found.append(node)
    return found


def _nodes_using_parameters_of(view: GraphView, nodes, module: str) -> list[onnx.NodeProto]:
    """Nodes fed by the module's parameters (``_conv_head.weight``): the dynamo exporter folds a Conv
    and its BatchNorm into one node scoped under the BatchNorm, so the Conv's name survives only there."""
    initializers = view.initializers
    return [node for node in nodes if node.output and node.output[0]
            and any(name in initializers and name.rsplit(".", 1)[0] == module for name in node.input)]


def _scope_contains(scope: list[str], parts: list[str], anchored: bool, loose: bool) -> bool:
    if not parts:
        return True
    qualified, spellings = _component_spellings(scope)
    for start in range(len(scope) - len(parts) + 1):
        if anchored and start > 0 and not _component_matches(parts[0], {qualified[start]}, loose):
            continue
        if all(_component_matches(part, spellings[start + i], loose) for i, part in enumerate(parts)):
            return True
    return False


def _component_spellings(scope: list[str]) -> tuple[list[str], list[set[str]]]:
    """Each scope component's dotted torch module name (absolute), and all the ways to write it:
    as written, dotted, and relative to its parent.

    Legacy ``layer4/layer4.1/conv1`` and dynamo ``layer4/layer4.1/layer4.1.conv1`` both give
    {layer4}, {layer4.1, 1}, {conv1, layer4.1.conv1}: either exporter's style finds either export.
    """
    qualified_names, spellings, parent = [], [], ""
    for part in scope:
        if parent and part.startswith(parent + "."):
            qualified, relative = part, part[len(parent) + 1:]
        else:
            qualified, relative = (f"{parent}.{part}" if parent else part), part
        qualified_names.append(qualified)
        spellings.append({part, qualified, relative})
        parent = qualified
    return qualified_names, spellings


def _component_matches(part: str, spellings: set[str], loose: bool) -> bool:
    if part in spellings:
        return True
    if loose:
        pattern = re.compile(re.escape(part) + r"_\d+")
        return any(pattern.fullmatch(spelling) for spelling in spellings)
    return False


def _spatial_or_error(node: onnx.NodeProto, by_tensor: dict[str, NodeInfo], view: GraphView) -> NodeInfo:
    candidate = by_tensor.get(node.output[0]) if node.output else None
    if candidate is not None and candidate.spatial:
        return candidate
    label = node.name or node.output[0]
    shape = candidate.shape if candidate is not None else view.static_shape(node.output[0])
    what = f"shape {shape_text(shape)}" if shape is not None else "a tensor of unknown shape"
    raise OnnxcamError(f"node {label} outputs {what}, which has no spatial axes; pick a convolutional layer "
                       "(see `onnxcam nodes MODEL`)")


def _unknown_spec_message(spec: str, candidates: list[NodeInfo]) -> str:
    names = set()
    for candidate in candidates:
        if not candidate.spatial:
            continue
        names.update(filter(None, (candidate.name, candidate.tensor)))
        components = candidate.scope.split("/") if candidate.scope else []
        for end in range(1, len(components) + 1):
            names.add("/".join(components[:end]))
        names.update(components)
    closest = difflib.get_close_matches(spec, sorted(names), n=5, cutoff=0.5)
    if not closest:  # compare with the last component too: `relu9` vs `.../relu_1`
        closest = difflib.get_close_matches(spec.strip("/").split("/")[-1], sorted(names), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(closest)}" if closest else ""
    return (f"no node, output tensor or module scope matches {spec!r}{hint} "
            "(list them with `onnxcam nodes MODEL`, or use --node auto)")


# ---------------------------------------------------------------- table


def _short_tensor(candidate: NodeInfo) -> str:
    """``…_output_0`` / ``…:0`` where the tensor repeats the node name (legacy torch, tf2onnx)."""
    if candidate.name and candidate.tensor.startswith(candidate.name) and candidate.tensor != candidate.name:
        return "…" + candidate.tensor[len(candidate.name):]
    return candidate.tensor


def format_table(candidates: list[NodeInfo], default: NodeInfo | None,
                 grids: dict[str, str] | None = None) -> str:
    """The `onnxcam nodes` listing: one row per candidate, `*` on the default, `-` on maps without
    spatial axes (pooled outputs cannot be explained). A tensor that repeats its node's name is
    abbreviated to ``…<suffix>``; the node name is accepted by --node all the same. ``grids``: tensor →
    its token grid (tokens.TokenGrid.text), shown in a last column when any node has one."""
    header = ("", "node", "op", "output tensor", "shape", "scope") + (("token grid",) if grids else ())
    rows = [header]
    for candidate in candidates:
        mark = "*" if default is not None and candidate.tensor == default.tensor else (
            "x" if not candidate.reaches_output else " " if candidate.spatial else "-")
        rows.append((mark, candidate.name or "(unnamed)", candidate.op_type, _short_tensor(candidate),
                     shape_text(candidate.shape), candidate.scope)
                    + ((grids.get(candidate.tensor, ""),) if grids else ()))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join(("-" if column else " ") * width for column, width in enumerate(widths)).rstrip())
    legend = []
    if default is not None:
        legend.append(f"* default (--node auto): {default.name or default.tensor}")
    if any(not candidate.spatial for candidate in candidates):
        legend.append("- no spatial axes left (pooled): cannot be explained")
    if any(not candidate.reaches_output for candidate in candidates):
        legend.append("x does not feed the model's first output: its gradient is zero (EigenCAM only)")
    return "\n".join(lines + legend)
