"""Write result files atomically (``atomic.write_atomic``: a temp file in the same folder, then
rename). A crash or a bad input never leaves a half-written PNG, and an input file is never overwritten.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from ._lazy import cv2
import numpy as np

from .atomic import write_atomic
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
    """Write ``data`` atomically (``atomic.write_atomic``), refusing to replace an input file."""
    path = Path(path)
    if path.resolve() in protected:
        raise OnnxcamError(f"refusing to overwrite input file {path}; choose another --out folder")
    try:
        return write_atomic(path, [data])
    except OSError as exc:
        raise OnnxcamError(f"cannot write {path} ({exc.strerror}); check the --out folder") from exc
    except MemoryError:
        raise OnnxcamError(f"not enough memory to write {path}") from None


def png_bytes(rgb: np.ndarray) -> bytes:
    return _encode_png(rgb, consume=False).tobytes()


def _encode_png(rgb: np.ndarray, consume: bool) -> np.ndarray:
    """PNG-encoded buffer; ``consume``: reorder the caller's (no longer needed) array in place
    instead of copying it, which matters for large photos."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR, dst=rgb) if consume else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    try:
        ok, buffer = cv2.imencode(".png", bgr)
    except (cv2.error, MemoryError) as exc:
        raise OnnxcamError(f"cannot encode the PNG ({type(exc).__name__}); the picture is too large "
                           "for the memory available") from None
    if not ok:
        raise OnnxcamError("OpenCV could not encode the PNG")
    return buffer


def write_png(path, rgb: np.ndarray, protected=frozenset(), consume: bool = False) -> Path:
    """Write ``rgb`` as a PNG; ``consume=True`` lets the encoder reuse ``rgb``'s memory (it is left
    in BGR order)."""
    return write_bytes_atomic(path, memoryview(_encode_png(rgb, consume)), protected)


def write_npy(path, array: np.ndarray, protected=frozenset()) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return write_bytes_atomic(path, buffer.getvalue(), protected)
