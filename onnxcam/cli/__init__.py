"""Command line: a thin shell over the Python API. Parses flags, calls the API, prints results.

Every OnnxcamError becomes one line on stderr and exit code 1; nothing else is printed for it. One
module per command family; `options.py` holds what several commands share.
"""
from __future__ import annotations

from . import compare, evaluate, explain, models  # noqa: F401  (registers the commands on ``main``)
from .app import main, run

__all__ = ["main", "run"]
