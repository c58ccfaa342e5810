"""Rules for the recurrent layers LSTM, GRU and RNN: the recurrence unrolled over a static length.

The backward graph recomputes the forward pass step by step (the node's own outputs do not hold the
cell states or gate values the derivative needs), then runs back through the steps in reverse order of
processing, in plain ONNX ops at the model's opset (Gather, MatMul, Sigmoid, Tanh, Mul, Concat, ...).
``_unroll`` holds what the three ops share: directions, layouts, initial states, ``sequence_lens``
masking and the gradient sources Y, Y_h and Y_c; a small cell class per op holds the gate maths.

Only the defaults are differentiated: activations (LSTM Sigmoid/Tanh/Tanh, GRU Sigmoid/Tanh,
RNN Tanh), no clip, no input_forget, no peepholes. W, R and B are constants of the explanation.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from . import rule
from .base import Emitter, Unsupported, node_attrs

DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class _Ops:
    """Small helpers over the emitter for [N, H] step tensors of one float type."""

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

    def cols(self, x, start, stop):
        """x[:, start:stop] of a 2-D tensor."""
        return self.e.op("Slice", [x, self.e.ints([start]), self.e.ints([stop]), self.e.ints([1])])

    def rows(self, x, start, stop):
        return self.e.op("Slice", [x, self.e.ints([start]), self.e.ints([stop]), self.e.ints([0])])

    def concat(self, xs, axis=1):
        return xs[0] if len(xs) == 1 else self.e.op("Concat", list(xs), axis=axis)


class _LSTMCell:
    """Gates i, o, f, c (ONNX order): c' = f*c + i*g, h' = o*tanh(c')."""
    gates, has_cell = 4, True

    def __init__(self, node):
        pass

    def forward(self, o: _Ops, w, xw, h, c):
        pre = o.add(xw, o.matmul(h, w["Rt"]))
        pre = o.add(pre, w["Rb"]) if w["Rb"] else pre
        H = w["H"]
        i, out, f = (o.e.op("Sigmoid", [o.cols(pre, k * H, (k + 1) * H)]) for k in range(3))
        g = o.e.op("Tanh", [o.cols(pre, 3 * H, 4 * H)])
        c_new = o.add(o.mul(f, c), o.mul(i, g))
        tc = o.e.op("Tanh", [c_new])
        return o.mul(out, tc), c_new, dict(i=i, o=out, f=f, g=g, tc=tc, c=c)

    def backward(self, o: _Ops, w, s, gh, gc):
        d_out = o.mul(gh, s["tc"])
        dc = o.add(gc, o.mul(gh, s["o"], o.dtanh(s["tc"])))
        d_pre = o.concat([o.mul(dc, s["g"], o.dsigmoid(s["i"])), o.mul(d_out, o.dsigmoid(s["o"])),
                          o.mul(dc, s["c"], o.dsigmoid(s["f"])), o.mul(dc, s["i"], o.dtanh(s["g"]))])
        return d_pre, o.matmul(d_pre, w["R"]), o.mul(dc, s["f"])


class _GRUCell:
    """Gates z, r, h (ONNX order): h' = (1-z)*n + z*h, with n = tanh(xWn + (r*h)Rn + Rbn) or, with
    linear_before_reset, n = tanh(xWn + r*(hRn + Rbn))."""
    gates, has_cell = 3, False

    def __init__(self, node):
        self.lbr = node_attrs(node).get("linear_before_reset", 0)

    def forward(self, o: _Ops, w, xw, h, c):
        H = w["H"]
        Rt_zr, Rt_n = o.cols(w["Rt"], 0, 2 * H), o.cols(w["Rt"], 2 * H, 3 * H)
        Rb = w["Rb"]
        hr = o.matmul(h, Rt_zr)
        if Rb:
            hr = o.add(hr, o.e.op("Slice", [Rb, o.e.ints([0]), o.e.ints([2 * H]), o.e.ints([0])]))
            Rb_n = o.e.op("Slice", [Rb, o.e.ints([2 * H]), o.e.ints([3 * H]), o.e.ints([0])])
        zr = o.e.op("Sigmoid", [o.add(o.cols(xw, 0, 2 * H), hr)])
        z, r = o.cols(zr, 0, H), o.cols(zr, H, 2 * H)
        if self.lbr:
            q = o.matmul(h, Rt_n)
            q = o.add(q, Rb_n) if Rb else q
            n = o.e.op("Tanh", [o.add(o.cols(xw, 2 * H, 3 * H), o.mul(r, q))])
        else:
            q = o.matmul(o.mul(r, h), Rt_n)
            q = o.add(q, Rb_n) if Rb else q
            n = o.e.op("Tanh", [o.add(o.cols(xw, 2 * H, 3 * H), q)])
        h_new = o.add(o.mul(o.one_minus(z), n), o.mul(z, h))
        return h_new, None, dict(z=z, r=r, n=n, h=h, q=q)

    def backward(self, o: _Ops, w, s, gh, gc):
        H = w["H"]
        R_zr, R_n = o.rows(w["R"], 0, 2 * H), o.rows(w["R"], 2 * H, 3 * H)
        d_n = o.mul(gh, o.one_minus(s["z"]), o.dtanh(s["n"]))
        dz = o.mul(gh, o.sub(s["h"], s["n"]), o.dsigmoid(s["z"]))
        dh = o.mul(gh, s["z"])
        if self.lbr:
            dr = o.mul(d_n, s["q"])
            dh = o.add(dh, o.matmul(o.mul(d_n, s["r"]), R_n))
        else:
            drh = o.matmul(d_n, R_n)
            dr = o.mul(drh, s["h"])
            dh = o.add(dh, o.mul(drh, s["r"]))
        d_zr = o.concat([dz, o.mul(dr, o.dsigmoid(s["r"]))])
        return o.concat([d_zr, d_n]), o.add(dh, o.matmul(d_zr, R_zr)), None


class _RNNCell:
    """h' = tanh(xW + hR + Wb + Rb)."""
    gates, has_cell = 1, False

    def __init__(self, node):
        pass

    def forward(self, o: _Ops, w, xw, h, c):
        pre = o.add(xw, o.matmul(h, w["Rt"]))
        h_new = o.e.op("Tanh", [o.add(pre, w["Rb"]) if w["Rb"] else pre])
        return h_new, None, dict(h_new=h_new)

    def backward(self, o: _Ops, w, s, gh, gc):
        d_pre = o.mul(gh, o.dtanh(s["h_new"]))
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


def _unroll(e: Emitter, node, gy, need, cell) -> list:
    op = node.op_type
    a = node_attrs(node)
    direction = a.get("direction", "forward")
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if directions is None:
        raise Unsupported(f"direction {direction!r}")
    _check_attributes(node, op, len(directions))
    if any(need[1:4]):
        raise Unsupported("gradient with respect to W, R or B (they depend on the wrt tensor)")
    layout = a.get("layout", 0)
    if layout not in (0, 1):
        raise Unsupported(f"layout {layout}")
    inputs = list(node.input) + [""] * (8 - len(node.input))
    X, W, R, B, seq_lens, h_init, c_init, P = inputs
    if P and not (e.value(P) is not None and not np.any(e.value(P))):
        raise Unsupported("peephole weights P are not differentiated")
    steps = (e.shape(X) or [None, None])[layout]
    if not isinstance(steps, int):
        raise Unsupported("needs a static sequence length (the time axis of the input is symbolic)")
    H = a.get("hidden_size") or e.static_dims(R, [2])[0]
    G = cell.gates
    o = _Ops(e, X)
    # state tensors are [N, H]; per-step and per-direction slices come off axis `layout` of X, Y, Y_h
    batch = e.op("Slice", [e.shape_of(X), e.ints([1 - layout]), e.ints([2 - layout]), e.ints([0])])
    zeros = e.op("ConstantOfShape", [e.op("Concat", [batch, e.ints([H])], axis=0)],
                 value=numpy_helper.from_array(np.zeros(1, e.np_dtype(X)), ""))

    def pick(t, i, axis=layout):
        return e.op("Gather", [t, e.const(np.array(i, np.int64))], axis=axis)

    masks = None
    if seq_lens:
        lens = e.op("Cast", [seq_lens], to=TensorProto.INT64)
        masks = [e.unsqueeze(e.op("Cast", [e.op("Less", [e.const(np.array(t, np.int64)), lens])],
                                  to=e.dtype(X)), [1]) for t in range(steps)]
    g_y, g_yh = gy[0], gy[1] if len(gy) > 1 else None
    g_yc = gy[2] if len(gy) > 2 else None
    gx, gh0s, gc0s = None, [], []
    for d, backwards in enumerate(directions):
        w = {"H": H, "R": pick(R, d, 0)}
        w["Rt"] = e.op("Transpose", [w["R"]], perm=[1, 0])
        W_d = pick(W, d, 0)
        xw = o.matmul(X, e.op("Transpose", [W_d], perm=[1, 0]))   # every step's input term at once
        w["Rb"] = None
        if B:
            B_d = pick(B, d, 0)
            xw = o.add(xw, e.op("Slice", [B_d, e.ints([0]), e.ints([G * H]), e.ints([0])]))
            w["Rb"] = e.op("Slice", [B_d, e.ints([G * H]), e.ints([2 * G * H]), e.ints([0])])
        h = pick(h_init, d) if h_init else zeros
        c = (pick(c_init, d) if c_init else zeros) if cell.has_cell else None
        order = list(range(steps))[::-1] if backwards else list(range(steps))
        saved = {}
        for t in order:
            h_new, c_new, saved[t] = cell.forward(o, w, pick(xw, t), h, c)
            if masks is None:
                h, c = h_new, c_new
            else:   # padding steps keep the state
                h = o.add(h, o.mul(masks[t], o.sub(h_new, h)))
                c = o.add(c, o.mul(masks[t], o.sub(c_new, c))) if cell.has_cell else None
        gh = pick(g_yh, d) if g_yh else zeros
        gc = (pick(g_yc, d) if g_yc else zeros) if cell.has_cell else None
        d_pre = {}
        for t in reversed(order):
            g_new = o.add(gh, pick(pick(g_y, t), d)) if g_y else gh
            gc_new = gc
            if masks is not None:   # Y is zero and the state is held on padding steps
                keep = o.one_minus(masks[t])
                g_new, held = o.mul(masks[t], g_new), o.mul(keep, gh)
                if cell.has_cell:
                    gc_new, held_c = o.mul(masks[t], gc), o.mul(keep, gc)
            d_pre[t], gh, gc = cell.backward(o, w, saved[t], g_new, gc_new)
            if masks is not None:
                gh = o.add(gh, held)
                gc = o.add(gc, held_c) if cell.has_cell else None
        gh0s.append(gh)
        gc0s.append(gc)
        if need[0]:
            stacked = o.concat([e.unsqueeze(d_pre[t], [layout]) for t in range(steps)], axis=layout)
            gx = o.add(gx, o.matmul(stacked, W_d))

    def stack(parts):
        return o.concat([e.unsqueeze(p, [layout]) for p in parts], axis=layout)

    out = [gx, None, None, None, None, stack(gh0s) if need[5:6] == [True] else None,
           stack(gc0s) if cell.has_cell and need[6:7] == [True] else None, None]
    return out[:len(node.input)]


@rule("LSTM")
def lstm(e: Emitter, node, gy, need):
    return _unroll(e, node, gy, need, _LSTMCell(node))


@rule("GRU")
def gru(e: Emitter, node, gy, need):
    lbr = node_attrs(node).get("linear_before_reset", 0)
    if lbr not in (0, 1):
        raise Unsupported(f"linear_before_reset={lbr}")
    return _unroll(e, node, gy, need, _GRUCell(node))


@rule("RNN")
def rnn(e: Emitter, node, gy, need):
    return _unroll(e, node, gy, need, _RNNCell(node))
