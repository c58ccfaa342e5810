"""Facts derived from the model bytes, computed once per (model, request) and kept in the cache.

The node table (``nodes.list_candidates``: ONNX shape inference with data propagation, and a probe
run on zeros where inference stops) and the scored output's declared shape (which needs that shape
inference too) cost a large model half a second or more; neither depends on anything but the model
bytes, the probe input shape and which output is scored. ``node_table`` reads them back from the cache
next to the augmented models, so a warm ``onnxcam explain`` runs neither shape inference nor the probe.
"""
from __future__ import annotations

from .cache import cached_json
from .model import LoadedModel
from .nodes import NodeInfo, list_candidates


def declared_shape(model: LoadedModel, tensor: str) -> tuple | None:
    """The tensor's dims as shape inference gives them (int, symbol or None), None when the rank is unknown."""
    shape = model.view.shape(tensor)
    return None if shape is None else tuple(shape)


def _to_json(candidates: list[NodeInfo], logits_shape: tuple | None) -> dict:
    return {"candidates": [[c.name, c.op_type, c.tensor, None if c.shape is None else list(c.shape), c.scope,
                            c.index, c.spatial, c.reaches_output] for c in candidates],
            "logits_shape": None if logits_shape is None else list(logits_shape)}


def _from_json(value: dict) -> tuple[list[NodeInfo], tuple | None]:
    candidates = [NodeInfo(name, op, tensor, None if shape is None else tuple(shape), scope, index, spatial, reaches)
                  for name, op, tensor, shape, scope, index, spatial, reaches in value["candidates"]]
    shape = value["logits_shape"]
    return candidates, None if shape is None else tuple(shape)


def node_table(model: LoadedModel, probe_shapes: dict | None, logits: str,
               digest_of_model: bytes | None) -> tuple[list[NodeInfo], tuple | None]:
    """(candidates, the scored output's declared shape) for ``model``: from the cache when ``digest_of_model`` is
    given (``cache.model_digest``) and this request was seen before, else computed (and stored)."""
    def build() -> dict:
        return _to_json(list_candidates(model, probe_shapes), declared_shape(model, logits))

    parts = {"family": "node_table", "probe": {k: list(v) for k, v in (probe_shapes or {}).items()},
             "logits": logits}
    return _from_json(cached_json(parts, digest_of_model, build) if digest_of_model is not None else build())
