"""``onnxcam explain --profile``: where one CLI call's time goes, printed on stderr.

Phases are timed exclusively: a phase that runs inside another (a session built during the first run)
is charged to itself, not to both, so the phases add up to the total. ``imports`` is the time from the
start of ``import onnxcam`` to the command (onnxcam and what it imports: onnx, NumPy, ONNX Runtime, ...);
``python`` the interpreter's own start before that, where the OS tells it (Linux /proc). Inputs are
read on a worker thread; with several batches that reading overlaps the run.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

ORDER = ("python", "imports", "model load", "node table", "session", "reading", "run", "writing")


class Profile:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._local = threading.local()    # per thread: [name, start, time spent in nested phases]
        self.enabled = False

    @property
    def _stack(self) -> list[list]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def start(self, import_start: float) -> None:
        """Begin profiling a command; ``import_start``: perf_counter() when ``import onnxcam`` began."""
        self.enabled = True
        self.seconds = {}
        self._origin = import_start
        now = time.perf_counter()
        started = _process_age()
        if started is not None:
            self.seconds["python"] = max(0.0, started - (now - import_start))
        self.seconds["imports"] = now - import_start

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - entry[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - entry[2]
            if self._stack:
                self._stack[-1][2] += spent

    def report(self) -> str:
        total = self.seconds.get("python", 0.0) + time.perf_counter() - self._origin
        other = total - sum(self.seconds.values())
        names = [n for n in ORDER if n in self.seconds] + [n for n in self.seconds if n not in ORDER]
        parts = [f"{name} {self.seconds[name]:.3f}" for name in names] + [f"other {max(other, 0.0):.3f}"]
        return f"profile (s): {' | '.join(parts)} | total {total:.3f}"


def _process_age() -> float | None:
    """Seconds since this process started (Linux), else None."""
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


PROFILE = Profile()
phase = PROFILE.phase
