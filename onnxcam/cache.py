"""Build once, run many: augmented models cached on disk, keyed by the model's bytes and the request.

Surgery and gradient building cost seconds on large models; a second ``onnxcam explain`` on the same
model and request reads the result back instead. The cache is best-effort by design: a file that is
missing, truncated or corrupt is rebuilt, and a directory that cannot be written just turns caching
off — caching never makes an explanation fail.

The folder is capped at ``$ONNXCAM_CACHE_MAX_MB`` (least recently used entries go first; see
``cache_limits``). Each file holds a short header (magic + sha256 of the payload) before the serialized model, so a
truncated or damaged file is recognised for certain, not parsed into a half model. Writes go through
``atomic.write_atomic``, the same as every output file.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import onnx

from . import cache_limits
from .atomic import write_atomic

CACHE_ENV = "ONNXCAM_CACHE_DIR"
_MAGIC = b"ONNXCAM-CACHE-1\n"
_DIGEST = hashlib.sha256().digest_size
# protobuf cannot serialize a message of 2 GiB or more; such models are rebuilt each time.
MAX_CACHED_BYTES = 2**31 - 1


def default_cache_dir() -> Path:
    """``$ONNXCAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxcam``, else ``~/.cache/onnxcam``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxcam"


def _version() -> str:
    from . import __version__
    return __version__


def cache_key(parts: dict, model_bytes: bytes) -> str:
    """sha256 over the model bytes, the request ``parts`` (JSON, sorted keys) and the onnxcam version."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(model_bytes).digest())
    request = dict(parts, onnxcam_version=_version())
    digest.update(json.dumps(request, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _read(path: Path) -> onnx.ModelProto | None:
    """The cached model, or None when the file is absent or fails its checksum or parse."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    header = len(_MAGIC) + _DIGEST
    if len(data) < header or not data.startswith(_MAGIC):
        return None
    payload = memoryview(data)[header:]
    if hashlib.sha256(payload).digest() != data[len(_MAGIC):header]:
        return None
    try:
        proto = onnx.ModelProto()
        proto.ParseFromString(payload)
    except Exception:
        return None
    return proto


def _write(path: Path, proto: onnx.ModelProto) -> bool:
    """Write atomically; False (and no file left behind) when the directory cannot be written."""
    try:
        payload = proto.SerializeToString()
    except Exception:   # over protobuf's 2 GB limit
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, [_MAGIC, hashlib.sha256(payload).digest(), payload])
        return True
    except (OSError, MemoryError):
        return False


def cached_model(parts: dict, model_proto: onnx.ModelProto | bytes,
                 build: Callable[[], onnx.ModelProto], cache_dir: str | os.PathLike | None = None,
                 ) -> onnx.ModelProto:
    """``build()``'s model for (``model_proto``, ``parts``), read from the cache when it was built before.

    ``parts`` names the request (nodes, method family, backend, probabilities, ...): anything that
    changes the built model must be in it. ``model_proto`` may be given as its serialized bytes when the
    caller has them. A model too large to serialize (≥ 2 GB) is built and returned without caching.
    """
    if isinstance(model_proto, (bytes, bytearray)):
        model_bytes = bytes(model_proto)
    else:
        if model_proto.ByteSize() > MAX_CACHED_BYTES:
            return build()
        model_bytes = model_proto.SerializeToString()
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{cache_key(parts, model_bytes)}.onnxcam"
    hit = _read(path)
    if hit is not None:
        cache_limits.touch(path)
        return hit
    proto = build()
    limit = cache_limits.max_bytes()
    if proto.ByteSize() <= min(MAX_CACHED_BYTES, limit) and _write(path, proto):
        cache_limits.evict(path.parent, keep=path, limit=limit)
    return proto
