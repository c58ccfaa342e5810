"""The `onnxcam` command group: every OnnxcamError becomes one line on stderr and exit code 1."""
from __future__ import annotations

import os
import sys

import click

from ..errors import OnnxcamError


class _Group(click.Group):
    """Turns OnnxcamError into a one-line message and a non-zero exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OnnxcamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory; use smaller inputs or --size, a smaller --batch-size, or a "
                       "lower --max-pixels", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="onnxcam")
def main():
    """Class activation maps (Grad-CAM, Score-CAM, LayerCAM, ...) for any ONNX model."""


def run():
    """The console entry point (``onnxcam``, ``python -m onnxcam.cli``): ``main``, then the process ends
    without the interpreter's teardown, which takes 0.08-0.13 s after an explain call (ONNX Runtime's
    sessions and thread pools, module finalisation; measured on 2 cores) and which onnxcam needs nothing
    from: every output is written atomically and closed before the command returns, and the standard
    streams are flushed here. A Ray runtime started by the command is left to stop the normal way (its
    exit handlers stop the local cluster), and an unexpected exception still prints its traceback."""
    try:
        main()                   # standalone mode: always ends in SystemExit with the exit code
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):      # sys.exit("message"): printed, exit code 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):    # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)
