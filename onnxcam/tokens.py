"""Transformer token activations mapped onto their patch grid, so every CAM method sees (N, C, h, w).

A ViT/DeiT block output is (N, T, C) with T = P + h·w: P prefix tokens (class, distillation, register
tokens) followed by the patch tokens in row-major order. The map of such a node is the patch tokens
reshaped to (N, h, w, C), channels moved first — the same transform pytorch-grad-cam asks its users to
write by hand (``t[:, 1:, :].reshape(N, h, w, C)`` then channels first). Gradients go through the
same transform. Tokens are always read on axis 1: a (N, C, T) tensor (a conv output flattened before
the transpose) cannot be told from (N, T, C) by its shape alone, so it is not guessed. Swin-style
(N, H, W, C) outputs are 4D and handled as channels-last by ``layouts``.

The grid is guessed from the input's spatial size: the smallest P such that T - P = h·w with h and w
the input's height and width shrunk by one common stride (a patch size); ``--tokens-grid H,W`` and
``--prefix-tokens P`` override the guess when it is ambiguous or wrong. Rank-3 tensors are read as
tokens on transformers only (a LayerNorm over the last axis of a rank-3 tensor in the graph) or when
the user gives either override.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .errors import OnnxcamError
from .graph import view_of

MAX_PREFIX = 16          # class + distillation + registers; DINOv2 with registers has 5
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}


@dataclass(frozen=True)
class TokenGrid:
    """Where a rank-3 tensor's patch tokens are and how they tile the image."""
    prefix: int          # tokens dropped before the patch tokens
    height: int
    width: int

    def text(self) -> str:
        prefix = f" after {self.prefix} prefix token{'s' if self.prefix != 1 else ''}" if self.prefix else ""
        return f"{self.height}x{self.width} tokens{prefix}"

    def to_map(self, array: np.ndarray) -> np.ndarray:
        """(N, T, C) → (N, C, h, w)."""
        patches = array[:, self.prefix:, :]
        return np.ascontiguousarray(
            patches.reshape(array.shape[0], self.height, self.width, array.shape[2]).transpose(0, 3, 1, 2))


def _consistent(h: int, w: int, height: int, width: int) -> bool:
    """h x w is the input grid shrunk by one common stride (floor or ceil division, as patch convs and
    padded patch merging give)."""
    if h > height or w > width:
        return False
    for stride in range(1, max(height, width) + 1):
        if (h, w) in ((height // stride, width // stride), (-(-height // stride), -(-width // stride))):
            return True
    return False


def _grid_for(tokens: int, input_spatial: tuple, grid: tuple | None, prefix: int | None):
    height, width = input_spatial
    prefixes = [prefix] if prefix is not None else range(0, min(MAX_PREFIX, tokens - 1) + 1)
    for p in prefixes:
        count = tokens - p
        if count < 1:
            continue
        if grid is not None:
            if grid[0] * grid[1] == count:
                return p, grid
            continue
        for h in range(1, count + 1):
            if count % h == 0 and _consistent(h, count // h, height, width):
                return p, (h, count // h)
    return None


def token_grid(shape: tuple | None, input_spatial: tuple | None, grid: tuple | None = None,
               prefix: int | None = None) -> TokenGrid | None:
    """The token grid of a rank-3 activation of an image model (2 input spatial axes), or None when the
    tensor is not rank 3 or the model's input is not an image. Raises when it is rank 3 on an image
    model but no grid fits (the user must say ``--tokens-grid``)."""
    if shape is None or len(shape) != 3 or input_spatial is None or len(input_spatial) != 2:
        return None
    if any(not isinstance(d, int) or d <= 0 for d in shape[1:]) or \
            any(not isinstance(d, int) or d <= 0 for d in input_spatial):
        return None
    found = _grid_for(shape[1], tuple(input_spatial), grid, prefix)
    if found is not None:
        p, (h, w) = found
        return TokenGrid(p, h, w)
    given = (f" with --tokens-grid {grid[0]},{grid[1]}" if grid else "") + \
            (f" and --prefix-tokens {prefix}" if prefix is not None else "")
    raise OnnxcamError(f"cannot lay the tokens of shape {tuple(shape)} on a patch grid of the "
                       f"{input_spatial[0]}x{input_spatial[1]} input{given}; say --tokens-grid H,W "
                       "(and --prefix-tokens P for the class/register tokens before the patches)")


def parse_grid(text: str | None) -> tuple[int, int] | None:
    """``--tokens-grid H,W`` → (H, W)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) < 1:
        raise OnnxcamError(f"--tokens-grid {text!r} must be HEIGHT,WIDTH in tokens, e.g. 14,14")
    return values


def is_transformer(model) -> bool:
    """True when the graph normalises rank-3 tensors over their last axis (LayerNorm on tokens), as
    ViT, DeiT and Swin do. Only then is a rank-3 activation read as tokens: a CNN's (N, C, H·W)
    reshape has the same shape as a short token sequence, and keeps its (N, C, L) reading."""
    view = view_of(model)
    for node in view.graph.node:
        if node.op_type in _NORMS and node.input:
            rank = view.rank(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            if rank in (3, None) and axis in (-1, 2):
                return True
    return False


def grids_of(candidates, input_spatial: tuple | None, grid: tuple | None = None,
             prefix: int | None = None) -> dict[str, str]:
    """tensor → its grid's description, for the rank-3 candidates of an image model (the listing)."""
    found = {}
    for candidate in candidates:
        if not candidate.spatial:
            continue
        try:
            tokens = token_grid(candidate.shape, input_spatial, grid, prefix)
        except OnnxcamError:
            found[candidate.tensor] = "no grid fits (--tokens-grid)"
            continue
        if tokens is not None:
            found[candidate.tensor] = tokens.text()
    return found


# ---------------------------------------------------------------- default node on a ViT

def _reaches_attention(view, tensor: str) -> bool:
    """A Softmax is met going forward from ``tensor`` before the next normalisation: the tensor feeds
    an attention block (ln_1), not an MLP (ln_2) or the head (the final norm)."""
    seen, queue = {tensor}, deque([tensor])
    while queue:
        for node in view.consumers.get(queue.popleft(), []):
            if node.op_type == "Softmax":
                return True
            if node.op_type in _NORMS:
                continue
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    queue.append(out)
    return False


def attention_norms(model) -> list:
    """The normalisation nodes whose output feeds attention (each block's first LayerNorm), in order."""
    view = view_of(model)
    return [node for node in view.graph.node
            if node.op_type in _NORMS and node.output and _reaches_attention(view, node.output[0])]


def default_transformer_node(candidates, model):
    """pytorch-grad-cam's choice for a ViT: the output of the last block's first LayerNorm
    (``target_layers=[model.blocks[-1].norm1]``); None when the graph has no attention block."""
    norms = attention_norms(model)
    if not norms:
        return None
    by_tensor = {candidate.tensor: candidate for candidate in candidates}
    found = by_tensor.get(norms[-1].output[0])
    return found if found is not None and found.spatial and found.shape and len(found.shape) == 3 else None
