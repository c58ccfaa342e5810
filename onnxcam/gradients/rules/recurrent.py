"""Rules for the recurrent layers LSTM, GRU and RNN, in plain ONNX at the model's opset.

The hidden state before every step comes from the node's own Y (a copy of the node gives it when Y
is not an output), so the gate values of all steps are recomputed at once with a few large MatMuls;
only LSTM's cell state needs a small Scan (c' = f*c + i*g). The derivative factors that do not depend
on the incoming gradient are also computed for all steps at once; what is left is one Scan back
through time per direction, a handful of ops per step, then one MatMul with W gives d/dX for every
step. The graph does not grow with the sequence length, which may be symbolic.
``_recur`` and ``_direction`` hold what the three ops share (directions, layouts, initial states,
``sequence_lens`` masking, the gradient sources Y, Y_h and Y_c); a small cell class per op holds the
gate maths.

Only the defaults are differentiated: activations (LSTM Sigmoid/Tanh/Tanh, GRU Sigmoid/Tanh,
RNN Tanh), no clip, no input_forget, no peepholes. W, R and B are constants of the explanation.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import rule
from .base import Emitter, Unsupported, node_attrs

_END = 2 ** 62   # a Slice end past any length
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class _Ops:
    """Small helpers over an emitter (the main graph's or a Scan body's) for tensors of one float type;
    the element-wise ones work alike on one step [N, k] and on stacked steps [T, N, k]."""

    def __init__(self, e: Emitter, like: str):
        self.e, self.like = e, like

    def mul(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = self.e.op("Mul", [out, x])
        return out

    def add(self, a, b):
        return b if a is None else self.e.op("Add", [a, b])

    def sub(self, a, b):
        return self.e.op("Sub", [a, b])

    def one_minus(self, x):
        return self.sub(self.e.scalar(1.0, self.like), x)

    def dsigmoid(self, s):       # sigma' from sigma(x)
        return self.mul(s, self.one_minus(s))

    def dtanh(self, t):          # tanh' from tanh(x)
        return self.one_minus(self.mul(t, t))

    def matmul(self, a, b):
        return self.e.op("MatMul", [a, b])

    def last(self, x, start, stop, axis=-1):
        """x[..., start:stop] (or along ``axis``)."""
        return self.e.op("Slice", [x, self.e.ints([start]), self.e.ints([stop]), self.e.ints([axis])])

    def split(self, x, n):
        """n equal parts of the last axis."""
        return self.e.op("Split", [x], n_out=n, axis=-1, num_outputs=n if self.e.opset >= 18 else None)

    def concat(self, xs, axis=-1):
        return xs[0] if len(xs) == 1 else self.e.op("Concat", list(xs), axis=axis)


# Each cell: ``prepare`` (LSTM, GRU: per-step input terms with the biases folded in, weight slices),
# ``recompute`` (the gate values of every step at once from the hidden states before each step, which
# the node's own Y gives; LSTM's cell state needs one small Scan), ``factors`` (every derivative factor
# that does not depend on the incoming gradient, for all steps at once) and ``backward`` (one step back
# in the backward Scan: gate pre-activation gradient, d h_prev, d c_prev), kept to a few ops because it
# runs once per step. All tensors here are time-major: [T, N, k] stacked, [N, k] per step.

class _LSTMCell:
    """Gates i, o, f, c (ONNX order): c' = f*c + i*g, h' = o*tanh(c')."""
    gates, has_cell, factor_keys = 4, True, ("A", "F", "f")

    def prepare(self, o: _Ops, w, xw, bias):
        return [o.add(xw, o.add(bias[0], bias[1])) if bias else xw]

    def recompute(self, o: _Ops, w, steps, h_prev, c0, masks):
        pre = o.split(o.add(steps[0], o.matmul(h_prev, w["Rt"])), 4)
        i, out, f = (o.e.op("Sigmoid", [p]) for p in pre[:3])
        g = o.e.op("Tanh", [pre[3]])

        def cell_state(s, state, step):   # the one recurrence left: c' = f*c + i*g
            c_new = s.add(s.mul(step[0], state[0]), step[1])
            held = s.add(state[0], s.mul(step[2], s.sub(c_new, state[0]))) if masks else c_new
            return [held], [state[0], c_new]

        c, c_new = _scan(o.e, o.like, cell_state, [c0], [(f, 0), (o.mul(i, g), 0)] + masks, 2, w["reverse"])[1]
        return dict(i=i, o=out, f=f, g=g, tc=o.e.op("Tanh", [c_new]), c=c)

    def factors(self, o: _Ops, w, s):
        F = o.concat([o.mul(s["g"], o.dsigmoid(s["i"])), o.mul(s["tc"], o.dsigmoid(s["o"])),
                      o.mul(s["c"], o.dsigmoid(s["f"])), o.mul(s["i"], o.dtanh(s["g"]))])
        return dict(A=o.mul(s["o"], o.dtanh(s["tc"])), F=F, f=s["f"])

    def backward(self, o: _Ops, w, k, gh, gc):
        dc = o.add(gc, o.mul(gh, k["A"]))
        d_pre = o.mul(o.concat([dc, gh, dc, dc]), k["F"])
        return d_pre, o.matmul(d_pre, w["R"]), o.mul(dc, k["f"])


class _GRUCell:
    """Gates z, r, h (ONNX order): h' = (1-z)*n + z*h, with n = tanh(xWn + (r*h)Rn + Rbn) or, with
    linear_before_reset, n = tanh(xWn + r*(hRn + Rbn))."""
    gates, has_cell = 3, False

    def __init__(self, linear_before_reset: int):
        self.lbr = linear_before_reset
        self.factor_keys = ("G", "Gr", "z") if self.lbr else ("Fn", "Fz", "Fr", "z", "r")

    def prepare(self, o: _Ops, w, xw, bias):
        H = w["H"]
        w["Rt_zr"], w["Rt_n"] = o.last(w["Rt"], 0, 2 * H), o.last(w["Rt"], 2 * H, 3 * H)
        if not self.lbr:
            w["R_zr"], w["R_n"] = o.last(w["R"], 0, 2 * H, 0), o.last(w["R"], 2 * H, 3 * H, 0)
        w["Rb_n"] = o.last(bias[1], 2 * H, 3 * H) if bias else None
        xw_zr, xw_n = o.last(xw, 0, 2 * H), o.last(xw, 2 * H, 3 * H)
        if bias:
            xw_zr = o.add(xw_zr, o.last(o.add(bias[0], bias[1]), 0, 2 * H))
            xw_n = o.add(xw_n, o.last(bias[0], 2 * H, 3 * H))
        return [xw_zr, xw_n]

    def recompute(self, o: _Ops, w, steps, h_prev, c0, masks):
        z, r = o.split(o.e.op("Sigmoid", [o.add(steps[0], o.matmul(h_prev, w["Rt_zr"]))]), 2)
        q = o.matmul(h_prev if self.lbr else o.mul(r, h_prev), w["Rt_n"])
        q = o.add(q, w["Rb_n"]) if w["Rb_n"] else q
        n = o.e.op("Tanh", [o.add(steps[1], o.mul(r, q) if self.lbr else q)])
        return dict(z=z, r=r, n=n, h=h_prev, q=q)

    def factors(self, o: _Ops, w, s):
        Fn = o.mul(o.one_minus(s["z"]), o.dtanh(s["n"]))          # d h' / d n-pre-activation
        Fz = o.mul(o.sub(s["h"], s["n"]), o.dsigmoid(s["z"]))     # d h' / d z-pre-activation
        Fr = o.mul(s["q"] if self.lbr else s["h"], o.dsigmoid(s["r"]))
        if not self.lbr:
            return dict(Fn=Fn, Fz=Fz, Fr=Fr, z=s["z"], r=s["r"])
        FnFr = o.mul(Fn, Fr)   # gate gradients are gh * G; what R sees is gh * Gr (n's part times r)
        return dict(G=o.concat([Fz, FnFr, Fn]), Gr=o.concat([Fz, FnFr, o.mul(Fn, s["r"])]), z=s["z"])

    def backward(self, o: _Ops, w, k, gh, gc):
        if self.lbr:
            g3 = o.concat([gh, gh, gh])
            dh = o.add(o.mul(gh, k["z"]), o.matmul(o.mul(g3, k["Gr"]), w["R"]))
            return o.mul(g3, k["G"]), dh, None
        d_n = o.mul(gh, k["Fn"])
        drh = o.matmul(d_n, w["R_n"])                               # d / d (r*h)
        d_zr = o.concat([o.mul(gh, k["Fz"]), o.mul(drh, k["Fr"])])
        dh = o.add(o.add(o.mul(gh, k["z"]), o.mul(drh, k["r"])), o.matmul(d_zr, w["R_zr"]))
        return o.concat([d_zr, d_n]), dh, None


class _RNNCell:
    """h' = tanh(xW + hR + Wb + Rb): the node's Y is all the derivative reads."""
    gates, has_cell, factor_keys = 1, False, ("F",)

    def recompute(self, o: _Ops, w, steps, h_prev, c0, masks):
        return dict(h_new=w["Y"])

    def factors(self, o: _Ops, w, s):
        return dict(F=o.dtanh(s["h_new"]))

    def backward(self, o: _Ops, w, k, gh, gc):
        d_pre = o.mul(gh, k["F"])
        return d_pre, o.matmul(d_pre, w["R"]), None


def _check_attributes(node, op: str, n_dirs: int) -> None:
    a = node_attrs(node)
    acts = a.get("activations")
    if acts:
        acts = [x.decode() if isinstance(x, bytes) else x for x in acts]
        if [x.lower() for x in acts] != [x.lower() for x in DEFAULT_ACTIVATIONS[op] * n_dirs]:
            raise Unsupported(f"activations {acts} (only the defaults {DEFAULT_ACTIVATIONS[op]} are differentiated)")
    if a.get("clip") is not None:
        raise Unsupported("clip (cell clipping) is not differentiated; export without it")
    if a.get("input_forget", 0):
        raise Unsupported("input_forget=1 (coupled input and forget gates) is not differentiated")


def _scan(e: Emitter, like: str, step, states: list[str], scanned: list[tuple[str, int]], n_out: int,
          reverse: bool) -> tuple[list[str], list[str]]:
    """One ONNX Scan over time: ``step(o, state_names, step_names) -> (new_states, step_outputs)`` writes
    the body; ``scanned`` pairs each sequence with its time axis. Step outputs are stacked on axis 0 in
    time order whatever the direction. Returns (final states, stacked step outputs)."""
    body = e.body()
    state_in = [body.fresh("state") for _ in states]
    step_in = [body.fresh("step") for _ in scanned]
    new_states, outs = step(_Ops(body, like), state_in, step_in)
    results, seen = [], set(state_in + step_in)
    for t in new_states + outs:   # a body output must be a tensor of its own: copy inputs and repeats
        results.append(body.op("Identity", [t]) if t in seen else t)
        seen.add(t)
    elem = e.dtype(like)
    graph = helper.make_graph(body.nodes, body.fresh("body"),
                              [helper.make_tensor_value_info(n, elem, None) for n in state_in + step_in],
                              [helper.make_tensor_value_info(n, elem, None) for n in results])
    direction = int(reverse)
    out = e.op("Scan", states + [t for t, _ in scanned], n_out=len(states) + n_out, body=graph,
               num_scan_inputs=len(scanned), scan_input_axes=[axis for _, axis in scanned],
               scan_input_directions=[direction] * len(scanned), scan_output_directions=[direction] * n_out)
    out = [out] if isinstance(out, str) else out
    return out[:len(states)], out[len(states):]


def _recur(e: Emitter, node, gy, need, cell) -> list:
    """Check the node, then each direction's gradients (``_direction``); dX summed over directions,
    the initial states' gradients stacked like the initial states."""
    a = node_attrs(node)
    direction = a.get("direction", "forward")
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if directions is None:
        raise Unsupported(f"direction {direction!r}")
    _check_attributes(node, node.op_type, len(directions))
    if any(need[1:4]):
        raise Unsupported("gradient with respect to W, R or B (they depend on the wrt tensor)")
    layout = a.get("layout", 0)
    if layout not in (0, 1):
        raise Unsupported(f"layout {layout}")
    X, W, R, B, seq_lens, h_init, c_init, P = list(node.input) + [""] * (8 - len(node.input))
    if P and not (e.value(P) is not None and not np.any(e.value(P))):
        raise Unsupported("peephole weights P are not differentiated")
    layer = dict(X=X, W=W, R=R, B=B, h_init=h_init, c_init=c_init, layout=layout, Y=_forward_outputs(e, node),
                 H=a.get("hidden_size") or e.static_dims(R, [2])[0])
    o = _Ops(e, X)
    # states are [N, H]; X, Y_h and the initial states carry time or direction on axis `layout`
    batch = e.op("Slice", [e.shape_of(X), e.ints([1 - layout]), e.ints([2 - layout]), e.ints([0])])
    layer["zeros"] = e.op("ConstantOfShape", [e.op("Concat", [batch, e.ints([layer["H"]])], axis=0)],
                          value=numpy_helper.from_array(np.zeros(1, e.np_dtype(X)), ""))
    layer["masks"] = _padding_masks(e, X, seq_lens, layout) if seq_lens else []
    sources = list(gy) + [None] * (3 - len(gy))
    gx, gh0s, gc0s = None, [], []
    for d, backwards in enumerate(directions):
        gx_d, gh0, gc0 = _direction(e, o, cell, layer, d, backwards, sources, need[0])
        gx = o.add(gx, gx_d) if need[0] else None
        gh0s.append(gh0)
        gc0s.append(gc0)

    def stack(parts):
        return o.concat([e.unsqueeze(p, [layout]) for p in parts], axis=layout)

    def wants(i):
        return len(need) > i and need[i]
    out = [gx, None, None, None, None, stack(gh0s) if wants(5) else None,
           stack(gc0s) if cell.has_cell and wants(6) else None, None]
    return out[:len(node.input)]


def _padding_masks(e: Emitter, X: str, seq_lens: str, layout: int) -> list:
    """[(mask, 0)] with mask [T, N, 1]: 1 on the steps of each sequence, 0 on its padding."""
    steps = e.op("Gather", [e.shape_of(X), e.const(np.array(layout, np.int64))])
    times = e.op("Range", [e.const(np.array(0, np.int64)), steps, e.const(np.array(1, np.int64))])
    lengths = e.unsqueeze(e.op("Cast", [seq_lens], to=TensorProto.INT64), [0])
    inside = e.op("Less", [e.unsqueeze(times, [1]), lengths])
    return [(e.unsqueeze(e.op("Cast", [inside], to=e.dtype(X)), [2]), 0)]


def _states_before(e: Emitter, o: _Ops, Y: str, h0: str, masks: list, reverse: bool) -> str:
    """h before each step, [T, N, H] time-major: the output of the step processed before it, h0 for the
    first. Reverse with sequence_lens: a sequence's first step is its last valid one, whose successor
    in time is padding; there (mask of the next step 0) the state is h0."""
    first = e.unsqueeze(h0, [0])
    if not reverse:
        return o.concat([first, o.last(Y, 0, -1, 0)], axis=0)
    if not masks:
        return o.concat([o.last(Y, 1, _END, 0), first], axis=0)
    m = masks[0][0]
    later = o.concat([o.last(Y, 1, _END, 0), o.mul(first, e.scalar(0.0, o.like))], axis=0)
    m_next = o.concat([o.last(m, 1, _END, 0), o.mul(o.last(m, 0, 1, 0), e.scalar(0.0, o.like))], axis=0)
    return o.add(o.mul(m_next, later), o.mul(o.one_minus(m_next), first))


def _direction(e: Emitter, o: _Ops, cell, layer: dict, d: int, backwards: bool, sources, need_x: bool):
    """(d/dX, d/d initial_h, d/d initial_c) of direction ``d``; ``sources`` are the gradients of Y,
    Y_h, Y_c (None when that output does not reach the score)."""
    layout, H, G, has_cell, masks = layer["layout"], layer["H"], cell.gates, cell.has_cell, layer["masks"]
    g_y, g_yh, g_yc = sources
    zeros = layer["zeros"]

    def pick(t, i, axis=layout):
        return e.op("Gather", [t, e.const(np.array(i, np.int64))], axis=axis)

    def time_major(t):   # [N, T, k] -> [T, N, k] under layout 1
        return e.op("Transpose", [t], perm=[1, 0, 2]) if layout else t

    w = {"H": H, "R": pick(layer["R"], d, 0), "reverse": backwards}
    w["Rt"] = e.op("Transpose", [w["R"]], perm=[1, 0])
    W_d = pick(layer["W"], d, 0)
    steps = []
    if cell.gates > 1:   # RNN's derivative reads Y only
        xw = time_major(o.matmul(layer["X"], e.op("Transpose", [W_d], perm=[1, 0])))   # all input terms at once
        bias = None
        if layer["B"]:
            B_d = pick(layer["B"], d, 0)
            bias = (o.last(B_d, 0, G * H), o.last(B_d, G * H, 2 * G * H))
        steps = cell.prepare(o, w, xw, bias)
    h0 = pick(layer["h_init"], d) if layer["h_init"] else zeros
    c0 = (pick(layer["c_init"], d) if layer["c_init"] else zeros) if has_cell else None
    w["Y"] = time_major(pick(layer["Y"], d, 1 + layout))            # h after every step
    kept = cell.recompute(o, w, steps, _states_before(e, o, w["Y"], h0, masks, backwards), c0, masks)
    factors = cell.factors(o, w, kept)
    seeds = [pick(g_yh, d) if g_yh else zeros] + ([pick(g_yc, d) if g_yc else zeros] if has_cell else [])

    def backward(s, state, step):
        gh, gc = state[0], state[1] if has_cell else None
        k = dict(zip(cell.factor_keys, step))
        rest = step[len(cell.factor_keys):]
        g_new = s.add(gh, rest.pop(0)) if g_y else gh
        gc_new = gc
        if masks:   # Y is zero and the state is held on padding steps
            m = rest[0]
            keep = s.one_minus(m)
            g_new, held = s.mul(m, g_new), s.mul(keep, gh)
            gc_new = s.mul(m, gc) if has_cell else None
        d_pre, gh, gc = cell.backward(s, w, k, g_new, gc_new)
        if masks:
            gh = s.add(gh, held)
            gc = s.add(gc, s.mul(keep, state[1])) if has_cell else None
        return [gh] + ([gc] if has_cell else []), [d_pre]

    scanned = [(factors[key], 0) for key in cell.factor_keys]
    scanned += [(time_major(pick(g_y, d, 1 + layout)), 0)] if g_y else []
    finals, (d_pre,) = _scan(e, layer["X"], backward, seeds, scanned + masks, 1, not backwards)
    gx = None
    if need_x:   # d_pre is [T, N, G*H]
        gx = time_major(o.matmul(d_pre, W_d))
    return gx, finals[0], finals[1] if has_cell else None


def _forward_outputs(e: Emitter, node) -> str:
    """The node's Y (every step's hidden state); a copy of the node computes it when Y is not an output."""
    if node.output and node.output[0]:
        return node.output[0]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = e.fresh(node.op_type)
    del copy.output[:]
    copy.output.append(e.fresh("Y"))
    e.nodes.append(copy)
    return copy.output[0]


@rule("LSTM")
def lstm(e: Emitter, node, gy, need):
    return _recur(e, node, gy, need, _LSTMCell())


@rule("GRU")
def gru(e: Emitter, node, gy, need):
    lbr = node_attrs(node).get("linear_before_reset", 0)
    if lbr not in (0, 1):
        raise Unsupported(f"linear_before_reset={lbr}")
    return _recur(e, node, gy, need, _GRUCell(lbr))


@rule("RNN")
def rnn(e: Emitter, node, gy, need):
    return _recur(e, node, gy, need, _RNNCell())
