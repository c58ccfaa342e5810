"""The one exception type users see: its message is a single line saying what is wrong and how to fix it."""


class OnnxcamError(Exception):
    """Bad input or an unsupported request. The CLI prints it as one line and exits non-zero."""
