"""Vector-Jacobian rules, one per ONNX op type, registered by name.

A rule is ``rule(e: Emitter, node, gy, need) -> list[str | None]``: ``gy[k]`` is the name of
d score / d node.output[k] (None when that output does not reach the score), ``need[i]`` says whether
node.input[i] wants a gradient; the rule returns one gradient name (or None) per input, each with that
input's shape and type. A rule raises ``Unsupported`` for an attribute or input it cannot handle exactly.
"""
from __future__ import annotations

from .base import Emitter, Unsupported, node_attrs  # noqa: F401

RULES: dict[str, callable] = {}
# ops whose rule accepts integer tensors on the differentiated path (their gradients are float, in
# integer units); any other rule meeting an integer tensor that carries the value is an error
INTEGER_RULES: set[str] = set()
# rules for ops of other domains, by (domain, op type): onnxruntime's com.microsoft Q/DQ (16-bit)
DOMAIN_RULES: dict[tuple[str, str], callable] = {}


def rule(*op_types: str, integer: bool = False, domains: tuple[str, ...] = ()):
    def register(fn):
        for op_type in op_types:
            RULES[op_type] = fn
            for domain in domains:
                DOMAIN_RULES[(domain, op_type)] = fn
            if integer:
                INTEGER_RULES.add(op_type)
        return fn
    return register


from . import (elementwise, linear, normalization, pooling, quantize, recurrent, resize,  # noqa: E402,F401
               shaping)
