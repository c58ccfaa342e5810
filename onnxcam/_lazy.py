"""Modules imported on first use. OpenCV costs ~0.25 s to import and only decoding, resizing on the
host and rendering need it, so the API on arrays with in-graph maps never loads it."""
from __future__ import annotations

import importlib


class LazyModule:
    """Stands for module ``name``; the first attribute read imports it."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attribute: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)


cv2 = LazyModule("cv2")
