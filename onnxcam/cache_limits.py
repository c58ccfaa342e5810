"""The cache's size cap and its maintenance: least-recently-used eviction, ``onnxcam cache info`` and
``onnxcam cache clear``.

Entries are ``*.onnxcam`` files (built models) and ``<key>.json`` files (the facts derived from a model:
node table, output shapes), both named by their 64-hex-digit cache key; other files in the folder are
never counted or removed. Reading an entry touches its modification time, so the oldest mtime is
the least recently used. After each write, the oldest entries are removed until the folder holds at
most ``$ONNXCAM_CACHE_MAX_MB`` megabytes (default 2048; 0 keeps nothing), and our temporaries left
by killed writers (older than ten minutes) go too.
"""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import is_our_temp, remove_stale_temps
from .errors import OnnxcamError

MAX_ENV = "ONNXCAM_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048
ENTRY_SUFFIX = ".onnxcam"
FACTS_SUFFIX = ".json"
_KEY_LENGTH = 64   # a sha256 hex digest (cache.cache_key)
TEMP_GRACE_S = 600.0   # a cache write is one call; a temporary this old has no live writer


def max_bytes() -> int:
    text = os.environ.get(MAX_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_MB * 2**20
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise OnnxcamError(f"{MAX_ENV}={text!r} must be a size in megabytes (0 disables the cache)")
    return int(value * 2**20)


def entries(folder: Path) -> list[tuple[float, int, Path]]:
    """(mtime, size, path) of every cache entry, oldest first."""
    out = []
    try:
        scan = list(os.scandir(folder))
    except OSError:
        return []
    for entry in scan:
        if is_entry(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, Path(entry.path)))
    return sorted(out)


def is_entry(name: str) -> bool:
    """Whether a file name is one of the cache's: any ``*.onnxcam``, or a cache key ``.json``."""
    if name.endswith(ENTRY_SUFFIX):
        return True
    stem = name[:-len(FACTS_SUFFIX)]
    return (name.endswith(FACTS_SUFFIX) and len(stem) == _KEY_LENGTH
            and all(c in "0123456789abcdef" for c in stem))


def touch(path: Path) -> None:
    """Mark an entry as just used (LRU order); best effort."""
    try:
        os.utime(path)
    except OSError:
        pass


def evict(folder: Path, keep: Path | None = None, limit: int | None = None) -> int:
    """Remove least recently used entries until the total is within ``limit`` bytes; ``keep`` (the
    entry just written) goes last. Returns how many were removed."""
    limit = max_bytes() if limit is None else limit
    remove_stale_temps(folder, grace=TEMP_GRACE_S)
    items = entries(folder)
    items.sort(key=lambda e: (e[2] == keep, e[0]))
    total = sum(size for _, size, _ in items)
    removed = 0
    for _, size, path in items:
        if total <= limit:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
    return removed


def info(folder: Path) -> dict:
    items = entries(folder)
    temps = []
    try:
        temps = [e.name for e in os.scandir(folder) if is_our_temp(e.name)]
    except OSError:
        pass
    return {"folder": str(folder), "entries": len(items), "bytes": sum(s for _, s, _ in items),
            "max_bytes": max_bytes(), "temporaries": len(temps),
            "oldest": min((m for m, _, _ in items), default=None),
            "newest": max((m for m, _, _ in items), default=None)}


def clear(folder: Path) -> tuple[int, int]:
    """Remove every entry and every temporary of ours (not other files); (count, bytes) removed."""
    count = freed = 0
    for _, size, path in entries(folder):
        try:
            path.unlink()
        except OSError:
            continue
        count += 1
        freed += size
    remove_stale_temps(folder, grace=0.0)
    return count, freed
