"""Build once, run many: augmented models cached on disk, keyed by the model's bytes and the request.

Surgery and gradient building cost seconds on large models; a second ``onnxcam explain`` on the same
model and request reads the result back instead. The cache is best-effort by design: a file that is
missing, truncated or corrupt is rebuilt, and a directory that cannot be written just turns caching
off — caching never makes an explanation fail.

The folder is capped at ``$ONNXCAM_CACHE_MAX_MB`` (least recently used entries go first; see
``cache_limits``). Each file holds a short header (magic, payload length, CRC-32 of the payload) before the
serialized model, so a truncated or damaged file is recognised, not parsed into a half model (CRC-32
checks an 18 MB model in ~4 ms where sha256 took ~12 ms: it guards against damage, not against someone
who can write the user's cache folder). Writes go through
``atomic.write_atomic``, the same as every output file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import onnx

from . import cache_limits
from .atomic import write_atomic

CACHE_ENV = "ONNXCAM_CACHE_DIR"
_MAGIC = b"ONNXCAM-CACHE-2\n"
_HEADER = len(_MAGIC) + 12          # then the payload's length (8 bytes) and CRC-32 (4), little-endian
# protobuf cannot serialize a message of 2 GiB or more; such models are rebuilt each time.
MAX_CACHED_BYTES = 2**31 - 1


def default_cache_dir() -> Path:
    """``$ONNXCAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxcam``, else ``~/.cache/onnxcam``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxcam"


@functools.lru_cache(maxsize=1)
def _version() -> str:
    """The onnxcam version and a digest of its own source files: an entry built by other code (a
    development checkout between releases, an upgrade) is never read back as if it were current."""
    from . import __version__
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def model_digest(model_proto: onnx.ModelProto | bytes) -> bytes | None:
    """sha256 of the serialized model (what every key starts from); None for a model too large to
    serialize (≥ 2 GB), which is then never cached. Compute it once per model and pass it on."""
    if isinstance(model_proto, (bytes, bytearray)):
        return hashlib.sha256(model_proto).digest()
    try:        # no ByteSize() check first: on a large model it costs as much as serializing
        data = model_proto.SerializeToString()
    except Exception:   # over protobuf's 2 GB limit
        return None
    return None if len(data) > MAX_CACHED_BYTES else hashlib.sha256(data).digest()


def cache_key(parts: dict, model_bytes: bytes | None = None, digest_of_model: bytes | None = None) -> str:
    """sha256 over the model bytes (or their ``model_digest``), the request ``parts`` (JSON, sorted keys)
    and the onnxcam version."""
    digest = hashlib.sha256()
    digest.update(digest_of_model if digest_of_model is not None else hashlib.sha256(model_bytes).digest())
    request = dict(parts, onnxcam_version=_version())
    digest.update(json.dumps(request, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _check_bytes(payload) -> bytes:
    return len(payload).to_bytes(8, "little") + zlib.crc32(payload).to_bytes(4, "little")


def _read_payload(path: Path) -> memoryview | None:
    """The cached bytes, or None when the file is absent or fails its length or checksum."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _HEADER or not data.startswith(_MAGIC):
        return None
    payload = memoryview(data)[_HEADER:]
    if _check_bytes(payload) != data[len(_MAGIC):_HEADER]:
        return None
    return payload


def _read(path: Path) -> onnx.ModelProto | None:
    """The cached model, or None when the file is absent or fails its checksum or parse."""
    payload = _read_payload(path)
    if payload is None:
        return None
    try:
        proto = onnx.ModelProto()
        proto.ParseFromString(payload)
    except Exception:
        return None
    return proto


def _write(path: Path, proto: onnx.ModelProto | bytes) -> bool:
    """Write atomically; False (and no file left behind) when the directory cannot be written."""
    try:
        payload = proto if isinstance(proto, bytes) else proto.SerializeToString()
    except Exception:   # over protobuf's 2 GB limit
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, [_MAGIC, _check_bytes(payload), payload])
        return True
    except (OSError, MemoryError):
        return False


def _load(path: Path) -> memoryview | None:
    """An entry's payload, marked as just used (the LRU order), or None."""
    payload = _read_payload(path)
    if payload is not None:
        cache_limits.touch(path)
    return payload


def _store(path: Path, payload: bytes) -> bool:
    """Write an entry within the size cap ($ONNXCAM_CACHE_MAX_MB), then evict the least recently used
    others down to it; False when it is not kept (too large, or the folder cannot be written)."""
    limit = cache_limits.max_bytes()
    if len(payload) > min(MAX_CACHED_BYTES, limit) or not _write(path, payload):
        return False
    cache_limits.evict(path.parent, keep=path, limit=limit)
    return True


def _path(parts: dict, digest_of_model: bytes, cache_dir, suffix: str) -> Path:
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return path / f"{cache_key(parts, digest_of_model=digest_of_model)}{suffix}"


def cached_model_bytes(parts: dict, digest_of_model: bytes | None, build: Callable[[], onnx.ModelProto],
                       cache_dir: str | os.PathLike | None = None) -> bytes:
    """As ``cached_model``, but the serialized model: what a session is made from, so a hit is never
    parsed and serialized again. ``digest_of_model``: ``model_digest`` of the source model (None:
    too large, built each time)."""
    if digest_of_model is None:
        return build().SerializeToString()
    path = _path(parts, digest_of_model, cache_dir, cache_limits.ENTRY_SUFFIX)
    hit = _load(path)
    if hit is not None:
        return bytes(hit)
    data = build().SerializeToString()
    _store(path, data)
    return data


def cached_json(parts: dict, digest_of_model: bytes | None, build: Callable[[], object],
                cache_dir: str | os.PathLike | None = None):
    """``build()``'s JSON-able value for (model, ``parts``), read back when computed before: the facts
    derived from the model bytes (node table, output shapes) that cost shape inference and a probe run."""
    if digest_of_model is None:
        return build()
    path = _path(parts, digest_of_model, cache_dir, cache_limits.FACTS_SUFFIX)
    hit = _load(path)
    if hit is not None:
        try:
            return json.loads(bytes(hit))
        except ValueError:
            pass
    value = build()
    _store(path, json.dumps(value).encode())
    return value


def cached_model(parts: dict, model_proto: onnx.ModelProto | bytes,
                 build: Callable[[], onnx.ModelProto], cache_dir: str | os.PathLike | None = None,
                 digest_of_model: bytes | None = None) -> onnx.ModelProto:
    """``build()``'s model for (``model_proto``, ``parts``), read from the cache when it was built before.

    ``parts`` names the request (nodes, method family, backend, probabilities, ...): anything that
    changes the built model must be in it. ``model_proto`` may be given as its serialized bytes when the
    caller has them. A model too large to serialize (≥ 2 GB) is built and returned without caching.
    """
    if digest_of_model is None:
        digest_of_model = model_digest(model_proto)
        if digest_of_model is None:
            return build()
    path = _path(parts, digest_of_model, cache_dir, cache_limits.ENTRY_SUFFIX)
    hit = _read(path)
    if hit is not None:
        cache_limits.touch(path)
        return hit
    proto = build()
    if proto.ByteSize() <= min(MAX_CACHED_BYTES, cache_limits.max_bytes()):
        try:
            _store(path, proto.SerializeToString())
        except Exception:   # over protobuf's 2 GB limit
            pass
    return proto
