"""The emitter every gradient rule writes through: fresh names, constants, opset-aware helper ops.

Rules never touch the model directly; they ask the ``Emitter`` for nodes, and the emitter knows the
model's opset (so ``ReduceSum`` gets its axes as an input from opset 13 on, as an attribute before),
the static shapes found by shape inference, and the values of constant tensors.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ...graph import FLOAT_TYPES, GraphBuilder, GraphView, Shape, attributes  # noqa: F401 (FLOAT_TYPES for the rules)


class Unsupported(Exception):
    """Raised by a rule when it has no exact gradient for this node (op, attribute or input)."""


node_attrs = attributes   # the rules' name for "this node's attributes as Python values"


class Emitter(GraphBuilder):
    """Collects the backward nodes (constants as Constant nodes); answers questions about forward
    tensors from the model's GraphView, plus the types of the tensors it adds itself."""

    def __init__(self, view: GraphView, taken: set[str], prefix: str = "onnxcam_bw/"):
        super().__init__(taken, prefix, view.opset)
        self._view = view
        self._types = view.types()
        self._own_constants: dict[str, np.ndarray] = {}
        self._shape_cache: dict[str, str] = {}
        self._compact: dict[str, str] = {}     # an emitted broadcast -> the smaller tensor it repeats
        self._ones: set[str] = set()           # emitted tensors known to hold only ones (the seed)

    def body(self) -> "Emitter":
        """An emitter for a subgraph body (Scan): names from the same pool, a prefix of its own, its own
        nodes and constants (Constant nodes inside the body); outer tensors stay visible to it."""
        return Emitter(self._view, self.taken, self.fresh("body") + "/")

    def const(self, value: np.ndarray) -> str:
        value = np.asarray(value)
        name = self.constant(value)
        self._types[name] = (helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
        self._own_constants[name] = value
        return name

    def np_dtype(self, like: str):
        return helper.tensor_dtype_to_np_dtype(self.dtype(like))

    def scalar(self, value: float, like: str) -> str:
        """A 0-d constant with the float type of tensor ``like``."""
        if self.dtype(like) == TensorProto.BFLOAT16:
            return self.op("Cast", [self.const(np.array(value, np.float32))], to=TensorProto.BFLOAT16)
        return self.const(np.array(value, dtype=self.np_dtype(like)))

    def array(self, value, like: str) -> str:
        if self.dtype(like) == TensorProto.BFLOAT16:
            return self.op("Cast", [self.const(np.asarray(value, np.float32))], to=TensorProto.BFLOAT16)
        return self.const(np.asarray(value, dtype=self.np_dtype(like)))

    def ints(self, values, hint: str = "ints") -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1))

    # ---- broadcasts the rules can skip ----------------------------------------------------------
    def expand_to(self, small: str, like: str) -> str:
        """``small`` (same rank) broadcast to the shape of forward tensor ``like``, remembered: a rule
        that multiplies the result by a tensor of that full shape broadcasts ``small`` instead
        (``compact``), and the Expand, then unused, is pruned. Same values, one full-size pass less."""
        return self.broadcasts(self.op("Expand", [small, self.shape_of(like)]), small)

    def broadcasts(self, full: str, small: str) -> str:
        """Record that emitted ``full`` holds ``small`` (same rank) broadcast to full size; return ``full``."""
        self._compact[full] = small
        return full

    def compact(self, g: str) -> str:
        """The smaller tensor ``g`` broadcasts (``expand_to``), else ``g`` itself."""
        return self._compact.get(g, g)

    def mark_ones(self, name: str) -> str:
        self._ones.add(name)
        return name

    def is_ones(self, name: str) -> bool:
        return name in self._ones

    def same_shape(self, a: str, b: str) -> bool:
        """Whether shape inference gives ``a`` and ``b`` the same dims (symbols included) at every axis."""
        sa, sb = self.shape(a), self.shape(b)
        return (sa is not None and sb is not None and len(sa) == len(sb)
                and all(x is not None and x == y for x, y in zip(sa, sb)))

    # ---- what is known about forward tensors --------------------------------------------------
    def dtype(self, name: str) -> int:
        t = self._types.get(name)
        if t is None or not t[0]:
            raise Unsupported(f"element type of tensor {name!r} unknown (shape inference failed)")
        return t[0]

    def shape(self, name: str) -> Shape:
        t = self._types.get(name)
        return None if t is None else t[1]

    def set_type(self, name: str, elem_type: int, shape: Shape) -> None:
        self._types[name] = (elem_type, shape)

    def rank(self, name: str) -> int:
        s = self.shape(name)
        if s is None:
            raise Unsupported(f"rank of tensor {name!r} unknown (shape inference failed)")
        return len(s)

    def static(self, name: str) -> tuple[int, ...] | None:
        s = self.shape(name)
        if s is None or not all(isinstance(d, int) for d in s):
            return None
        return tuple(s)

    def static_dims(self, name: str, axes) -> list[int]:
        s = self.shape(name)
        dims = [None if s is None else s[a] for a in axes]
        if not all(isinstance(d, int) for d in dims):
            raise Unsupported(f"needs static sizes of axes {list(axes)} of tensor {name!r}, got {s}")
        return dims

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant, folded constant subgraph), else None."""
        if not name:
            return None
        if name in self._own_constants:
            return self._own_constants[name]
        return self._view.constant(name)

    def required_value(self, name: str, what: str) -> np.ndarray:
        v = self.value(name)
        if v is None:
            raise Unsupported(f"{what} must be a constant (initializer or Constant node)")
        return v

    # ---- opset-aware helper ops -----------------------------------------------------------------
    def shape_of(self, x: str) -> str:
        if x not in self._shape_cache:
            self._shape_cache[x] = self.op("Shape", [x])
        return self._shape_cache[x]

    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1) -> str:
        return self.axes_op(op_type, x, axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes) -> str:
        return self.axes_op("Unsqueeze", x, axes)

    def squeeze(self, x: str, axes) -> str:
        return self.axes_op("Squeeze", x, axes)

    def zeros_like(self, x: str) -> str:
        zero = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(self.dtype(x))), "")
        return self.op("ConstantOfShape", [self.shape_of(x)], value=zero)

    def reshape_like(self, g: str, target: str) -> str:
        """Reshape a gradient to the shape of forward tensor ``target``: a constant shape when at most
        one dim (the batch, typically) is unknown (-1 there: the sizes agree), else Shape(target)."""
        dims = self.shape(target)
        unknown = [d for d in dims or [None] if not (isinstance(d, int) and d > 0)]
        if dims is not None and len(unknown) <= 1:
            shape = self.ints([d if isinstance(d, int) and d > 0 else -1 for d in dims])
        else:
            shape = self.shape_of(target)
        return self.op("Reshape", [g, shape])

    def transpose_last_two(self, x: str, rank: int) -> str:
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return self.op("Transpose", [x], perm=perm)

    def unbroadcast(self, g: str, g_shape: Shape, target: str, target_shape: Shape = None) -> str:
        """Sum a gradient of the broadcast shape ``g_shape`` back to the shape of ``target``.

        Static shapes give constant axes; dims that are only known at run time use a Shape-based
        reduction (opset 13+, where ReduceSum takes its axes as a tensor).
        """
        ts = target_shape if target_shape is not None else self.shape(target)
        if ts is not None and g_shape is not None:
            lead = len(g_shape) - len(ts)
            if lead < 0:
                raise Unsupported(f"gradient rank {len(g_shape)} below operand rank {len(ts)}")
            axes, dynamic = list(range(lead)), False
            for i, td in enumerate(ts):
                gd = g_shape[lead + i]
                if td == 1:
                    if gd != 1:
                        axes.append(lead + i)
                elif isinstance(td, int) or (isinstance(td, str) and td == gd):
                    continue
                else:
                    dynamic = True
            if not dynamic:
                if not axes:
                    return g
                out = self.reduce("ReduceSum", g, axes, keepdims=1)
                return self.squeeze(out, range(lead)) if lead else out
        return self._dynamic_unbroadcast(g, target, g_shape, ts)

    def _dynamic_unbroadcast(self, g: str, target: str, g_dims: Shape = None, t_dims: Shape = None) -> str:
        if self.opset < 13:
            return self._axis_by_axis_unbroadcast(g, g_dims, target, t_dims)
        g_shape, t_shape = self.op("Shape", [g]), self.shape_of(target)
        lead = self.op("Sub", [self.op("Size", [g_shape]), self.op("Size", [t_shape])])
        ones = self.op("ConstantOfShape", [self.unsqueeze(lead, [0])],
                       value=numpy_helper.from_array(np.ones(1, np.int64), ""))
        padded = self.op("Concat", [ones, t_shape], axis=0)
        differs = self.op("Not", [self.op("Equal", [padded, g_shape])])
        axes = self.op("Reshape", [self.op("NonZero", [differs]), self.ints([-1])])
        summed = self.op("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", [summed, t_shape])

    def _axis_by_axis_unbroadcast(self, g: str, g_rank: Shape, target: str, t_shape: Shape) -> str:
        """The opset-11/12 form (ReduceSum takes static axes there): with the ranks known, each axis
        whose size is known only at run time is summed, and the sum is kept where the operand's size is
        1 and the gradient's is not (Where, then a Slice to the operand's size)."""
        if g_rank is None or t_shape is None:
            raise Unsupported("broadcast with run-time-only shapes and ranks (opset < 13)")
        lead = len(g_rank) - len(t_shape)
        if lead < 0:
            raise Unsupported(f"gradient rank {len(g_rank)} below operand rank {len(t_shape)}")
        if lead:
            g = self.squeeze(self.reduce("ReduceSum", g, range(lead), keepdims=1), range(lead))
        target_dims, one = self.shape_of(target), self.ints([1])
        for axis, dim in enumerate(t_shape):
            if isinstance(dim, int) and (dim != 1 or g_rank[lead + axis] == 1):
                continue   # statically equal sizes: nothing to sum
            summed = self.reduce("ReduceSum", g, [axis], keepdims=1)
            if dim == 1:
                g = summed
                continue
            index = self.ints([axis])
            t_dim = self.op("Gather", [target_dims, index], axis=0)
            g_dim = self.op("Gather", [self.op("Shape", [g]), index], axis=0)
            broadcast = self.op("And", [self.op("Equal", [t_dim, one]), self.op("Not", [self.op("Equal", [g_dim, one])])])
            picked = self.op("Where", [broadcast, self.op("Expand", [summed, self.op("Shape", [g])]), g])
            g = self.op("Slice", [picked, self.ints([0]), t_dim, index])
        return g
