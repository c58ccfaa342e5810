"""Rules for the recurrent layers LSTM, GRU and RNN: two ONNX Scans per direction.

The node's own outputs do not hold the cell states or gate values the derivative needs, so a first Scan
recomputes the forward pass and stacks, per step, what the derivative reads; a second Scan runs back
through time in the opposite direction and stacks the gate pre-activation gradients, which one MatMul
with W turns into d/dX for every step at once. Both are plain ONNX (Scan, MatMul, Sigmoid, Tanh, Mul,
...) at the model's opset, and their size does not grow with the sequence length, which may be symbolic.
``_recur`` holds what the three ops share (directions, layouts, initial states, ``sequence_lens``
masking, the gradient sources Y, Y_h and Y_c); a small cell class per op holds the gate maths.

Only the defaults are differentiated: activations (LSTM Sigmoid/Tanh/Tanh, GRU Sigmoid/Tanh,
RNN Tanh), no clip, no input_forget, no peepholes. W, R and B are constants of the explanation.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

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
    gates, has_cell, saved = 4, True, ("i", "o", "f", "g", "tc", "c")

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
    gates, has_cell, saved = 3, False, ("z", "r", "n", "h", "q")

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
    gates, has_cell, saved = 1, False, ("h_new",)

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


def _scan(e: Emitter, like: str, step, states: list[str], scanned: list[tuple[str, int]], n_out: int,
          reverse: bool) -> tuple[list[str], list[str]]:
    """One ONNX Scan over time: ``step(o, state_names, step_names) -> (new_states, step_outputs)`` writes
    the body; ``scanned`` pairs each sequence with its time axis. Step outputs are stacked on axis 0 in
    time order whatever the direction. Returns (final states, stacked step outputs)."""
    body = e.body()
    state_in = [body.fresh("state") for _ in states]
    step_in = [body.fresh("step") for _ in scanned]
    new_states, outs = step(_Ops(body, like), state_in, step_in)
    results = [body.op("Identity", [t]) for t in new_states + outs]   # body outputs are fresh tensors
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
    """Forward Scan (recomputing the gates, saving what the derivative reads), then a Scan back through
    time in the opposite direction; per direction, then summed (dX) or stacked (initial states)."""
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
    X, W, R, B, seq_lens, h_init, c_init, P = list(node.input) + [""] * (8 - len(node.input))
    if P and not (e.value(P) is not None and not np.any(e.value(P))):
        raise Unsupported("peephole weights P are not differentiated")
    H = a.get("hidden_size") or e.static_dims(R, [2])[0]
    G, has_cell = cell.gates, cell.has_cell
    o = _Ops(e, X)
    # states are [N, H]; X, Y_h and the initial states carry time or direction on axis `layout`
    batch = e.op("Slice", [e.shape_of(X), e.ints([1 - layout]), e.ints([2 - layout]), e.ints([0])])
    zeros = e.op("ConstantOfShape", [e.op("Concat", [batch, e.ints([H])], axis=0)],
                 value=numpy_helper.from_array(np.zeros(1, e.np_dtype(X)), ""))

    def pick(t, i, axis=layout):
        return e.op("Gather", [t, e.const(np.array(i, np.int64))], axis=axis)

    masks = []   # [T, N, 1]: 1 on the steps of each sequence, 0 on its padding
    if seq_lens:
        steps = e.op("Gather", [e.shape_of(X), e.const(np.array(layout, np.int64))])
        times = e.op("Range", [e.const(np.array(0, np.int64)), steps, e.const(np.array(1, np.int64))])
        lengths = e.unsqueeze(e.op("Cast", [seq_lens], to=TensorProto.INT64), [0])
        inside = e.op("Less", [e.unsqueeze(times, [1]), lengths])
        masks = [(e.unsqueeze(e.op("Cast", [inside], to=e.dtype(X)), [2]), 0)]
    g_y, g_yh = gy[0], gy[1] if len(gy) > 1 else None
    g_yc = gy[2] if len(gy) > 2 else None
    keys = cell.saved
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
        start = [pick(h_init, d) if h_init else zeros] + ([pick(c_init, d) if c_init else zeros] if has_cell else [])

        def forward(s, state, step):
            h, c = state[0], state[1] if has_cell else None
            h_new, c_new, saved = cell.forward(s, w, step[0], h, c)
            if masks:   # padding steps keep the state
                m = step[1]
                h_new = s.add(h, s.mul(m, s.sub(h_new, h)))
                c_new = s.add(c, s.mul(m, s.sub(c_new, c))) if has_cell else None
            return [h_new] + ([c_new] if has_cell else []), [saved[k] for k in keys]

        _, stacked = _scan(e, X, forward, start, [(xw, layout)] + masks, len(keys), backwards)
        seeds = [pick(g_yh, d) if g_yh else zeros] + ([pick(g_yc, d) if g_yc else zeros] if has_cell else [])
        sources = [(pick(g_y, d, 1 + layout), layout)] if g_y else []

        def backward(s, state, step):
            gh, gc = state[0], state[1] if has_cell else None
            saved = dict(zip(keys, step))
            rest = step[len(keys):]
            g_new = s.add(gh, rest.pop(0)) if g_y else gh
            gc_new = gc
            if masks:   # Y is zero and the state is held on padding steps
                m = rest[0]
                keep = s.one_minus(m)
                g_new, held = s.mul(m, g_new), s.mul(keep, gh)
                gc_new = s.mul(m, gc) if has_cell else None
            d_pre, gh, gc = cell.backward(s, w, saved, g_new, gc_new)
            if masks:
                gh = s.add(gh, held)
                gc = s.add(gc, s.mul(keep, state[1])) if has_cell else None
            return [gh] + ([gc] if has_cell else []), [d_pre]

        finals, (d_pre,) = _scan(e, X, backward, seeds, [(t, 0) for t in stacked] + sources + masks, 1,
                                 not backwards)
        gh0s.append(finals[0])
        gc0s.append(finals[1] if has_cell else None)
        if need[0]:   # d_pre is [T, N, G*H]
            gxd = o.matmul(d_pre, W_d)
            gx = o.add(gx, e.op("Transpose", [gxd], perm=[1, 0, 2]) if layout else gxd)

    def stack(parts):
        return o.concat([e.unsqueeze(p, [layout]) for p in parts], axis=layout)

    out = [gx, None, None, None, None, stack(gh0s) if need[5:6] == [True] else None,
           stack(gc0s) if has_cell and need[6:7] == [True] else None, None]
    return out[:len(node.input)]


@rule("LSTM")
def lstm(e: Emitter, node, gy, need):
    return _recur(e, node, gy, need, _LSTMCell(node))


@rule("GRU")
def gru(e: Emitter, node, gy, need):
    lbr = node_attrs(node).get("linear_before_reset", 0)
    if lbr not in (0, 1):
        raise Unsupported(f"linear_before_reset={lbr}")
    return _recur(e, node, gy, need, _GRUCell(node))


@rule("RNN")
def rnn(e: Emitter, node, gy, need):
    return _recur(e, node, gy, need, _RNNCell(node))
