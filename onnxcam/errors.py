"""The one exception type users see: its message is a single line saying what is wrong and how to fix it."""


class OnnxcamError(Exception):
    """Bad input or an unsupported request. The CLI prints it as one line and exits non-zero."""


def shape_text(shape) -> str:
    """A shape for a message: ``(1, 3, ?, ?)``, unknown dims as ``?`` and symbols by name."""
    if shape is None:
        return "?"
    dims = ["?" if d is None or d == 0 or d == "" else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
