"""The gradient models of one Explainer: built once (or once per input shape), cached on disk, each
with its session.

The generic augmented model serves every input shape. When the backward graph needs shapes the model
only computes at run time (tf2onnx and paddle2onnx exports) and the generic build fails, the model is
specialised to the shape of the batch (surgery.specialise_shapes; the probe input's shape when no
batch is at hand yet) and built for that shape. Every model is kept in the on-disk cache under the
model's digest and the request, and its session is made straight from the cached bytes.
"""
from __future__ import annotations

import numpy as np
import onnx

from .cache import cached_json, cached_model_bytes
from .errors import OnnxcamError
from .gradients import ort_training_available
from .runtime import Runner
from .surgery import AugmentedModel, build_gradient_augmented_model, specialise_shapes


class GradientModels:
    def __init__(self, explainer):
        self.e = explainer
        self._models: dict[tuple | None, AugmentedModel] = {}   # None: the generic one, every shape
        self._runners: dict[tuple | None, Runner] = {}
        self._bytes: dict[int, bytes] = {}     # serialized models not yet in a session
        self.generic_failure: OnnxcamError | None = None
        self.last_used: AugmentedModel | None = None
        self._facts: dict | None = None     # the cached record of the generic model (generic_backend)

    def generic_backend(self) -> str | None:
        """The backend of the generic gradient model, None when it cannot be built. Kept in the cache
        as a small record next to the model, so in-graph maps whose own model is cached never read
        (and parse) the gradient model just to learn this."""
        if None in self._models:
            return self._models[None].backend
        if self.generic_failure is not None:
            return None
        if self._facts is None:
            def facts() -> dict:
                try:
                    return {"backend": self._models[None].backend if self._generic() else None}
                except OnnxcamError:
                    return {"backend": None}
            self._facts = cached_json(self._parts(None, "gradient_facts"), self.e._digest, facts) \
                if self.e.cache and self.e._digest is not None else facts()
        return self._facts.get("backend")

    def _generic(self) -> bool:
        """Build the generic model if not tried yet; True when it exists."""
        if None not in self._models and self.generic_failure is None:
            try:
                self._models[None] = self._built(None)
            except OnnxcamError as exc:
                if self.e.grad_backend == "ort-training":
                    raise
                self.generic_failure = exc
        return self.generic_failure is None

    def build(self, x: np.ndarray | None) -> tuple[tuple | None, AugmentedModel]:
        """(shape key or None for the generic model, the augmented model) for the batch ``x``."""
        if self._generic():
            return None, self._models[None]
        feeds = self._specialisation_feeds(x)
        if feeds is None:
            raise self.generic_failure
        key = tuple(sorted((name, tuple(value.shape)) for name, value in feeds.items()))
        if key not in self._models:
            self._models[key] = self._built(feeds)
        return key, self._models[key]

    def session(self, x: np.ndarray | None = None) -> tuple[AugmentedModel, Runner]:
        key, augmented = self.build(x)
        if key not in self._runners:
            data = self._bytes.pop(id(augmented.proto), None) or augmented.proto
            self._runners[key] = Runner(data, augmented.output_names, self.e.provider, self.e.threads)
        self.last_used = augmented
        return augmented, self._runners[key]

    @property
    def backend_used(self) -> str | None:
        used = self.last_used or self._models.get(None)   # in-graph maps run the generic one
        return used.backend if used else (self._facts or {}).get("backend")

    def _specialisation_feeds(self, x: np.ndarray | None) -> dict | None:
        e = self.e
        if x is None:
            if e._probe_shape is None or None in e._probe_shape:
                return None
            x = np.zeros(e._probe_shape, np.float32)
        return {e.model.input.name: x, **e.feeds.for_batch(len(x))}

    def _parts(self, feeds: dict | None, family: str = "gradient") -> dict:
        e = self.e
        return {"family": family, "nodes": e.tensors, "backend": e.grad_backend,
                "probabilities": e.probabilities, "output": e.output,
                "training_runtime": ort_training_available(),
                "specialised_to": None if feeds is None else {k: list(v.shape) for k, v in feeds.items()}}

    def _built(self, feeds: dict | None) -> AugmentedModel:
        e = self.e

        def build() -> onnx.ModelProto:
            model = e.model if feeds is None else specialise_shapes(e.model, feeds)
            return build_gradient_augmented_model(model, e.tensors, e.grad_backend, e.probabilities,
                                                  e.output).proto

        if not e.cache or e._digest is None:
            proto = build()
        else:
            data = cached_model_bytes(self._parts(feeds), e._digest, build)
            proto = onnx.load_from_string(data)
            self._bytes[id(proto)] = data
        return AugmentedModel.from_gradient_proto(proto, e.model.input.name, e.logits_name, e.tensors)
