"""The one atomic file write (outputs and cache entries alike), and the clean-up of what a killed
writer leaves behind.

A file is written to a temporary name in its own folder, flushed, given the permissions every other
tool would give it (``0666 & ~umask``; mkstemp alone creates 0600), then renamed over the target
(atomic on POSIX and Windows). Readers therefore see the old file or the complete new one, never a
partial one. A process killed between mkstemp and rename leaves its temporary file; temporaries are
named ``.<target name>.<8 random characters>.tmp``, so ``remove_stale_temps`` can recognise (only)
ours and remove those older than the current run.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"
_TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")   # mkstemp's 8 random characters
# a temporary last written this long before the run started belongs to no live writer (each of ours
# is written by one call and renamed at once); runs killed less than this before are cleaned next time
STALE_GRACE_S = 2.0
_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is not thread-safe)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status") as status:
                line = next(line for line in status if line.startswith("Umask:"))
            _UMASK = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def write_atomic(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> Path:
    """Write the concatenated ``chunks`` to ``path`` atomically; raises OSError (nothing left behind)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=TEMP_SUFFIX, dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def is_our_temp(name: str) -> bool:
    return bool(_TEMP_PATTERN.match(name))


def remove_stale_temps(folder: str | os.PathLike, started: float | None = None,
                       grace: float = STALE_GRACE_S) -> int:
    """Remove our temporaries in ``folder`` last written before ``started`` (default now) minus
    ``grace`` seconds; return how many. Other files, and temporaries of live writers, are left alone."""
    limit = (time.time() if started is None else started) - grace
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not is_our_temp(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < limit:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed
