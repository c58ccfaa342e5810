"""Write result files atomically: a temp file in the same folder, then rename. A crash or a bad input
never leaves a half-written PNG, and an input file is never overwritten.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from ._lazy import cv2
import numpy as np

from .errors import OnnxcamError


def prepare_dir(path: str | Path) -> Path:
    """Create the output folder if needed and check it is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OnnxcamError(f"output directory {path} is a file; pass a folder with --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxcamError(f"cannot create output directory {path} ({exc.strerror}); "
                           "pass a writable folder with --out") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OnnxcamError(f"output directory {path} is not writable; pass a writable folder with --out")
    return path


def write_bytes_atomic(path: str | Path, data: bytes, protected: set[Path] = frozenset()) -> Path:
    path = Path(path)
    if path.resolve() in protected:
        raise OnnxcamError(f"refusing to overwrite input file {path}; choose another --out folder")
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OnnxcamError(f"cannot write {path} ({exc.strerror}); check the --out folder") from exc
        raise
    return path


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OnnxcamError("OpenCV could not encode the PNG")
    return buffer.tobytes()


def write_png(path, rgb: np.ndarray, protected=frozenset()) -> Path:
    return write_bytes_atomic(path, png_bytes(rgb), protected)


def write_npy(path, array: np.ndarray, protected=frozenset()) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return write_bytes_atomic(path, buffer.getvalue(), protected)
