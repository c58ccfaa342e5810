"""The `onnxcam` command group: every OnnxcamError becomes one line on stderr and exit code 1."""
from __future__ import annotations

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
