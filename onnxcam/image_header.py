"""Image sizes read from file headers, before anything is decoded.

A 1 KB PNG can declare 100000 x 100000 pixels and a few hundred KB of zlib data can inflate to
gigabytes; the only safe moment to refuse such a file is before the decoder allocates. This module
reads width and height from the headers of PNG, JPEG, BMP, WebP, TIFF and PNM files (a few bytes,
a few seeks), so ``preprocess.read_image`` can compare them with the pixel limit first. OpenCV's own
limit (``OPENCV_IO_MAX_IMAGE_PIXELS``) is set too, as a backstop for formats not parsed here.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

DEFAULT_MAX_PIXELS = 100_000_000      # 100 megapixels, as image libraries' default bomb limits


class HeaderError(ValueError):
    """The file starts like an image of a known format but its header is damaged."""


def image_size(handle: BinaryIO) -> tuple[int, int] | None:
    """(width, height) from the header, None for a format not parsed here; HeaderError if damaged."""
    head = handle.read(32)
    handle.seek(0)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg(handle)
    if head.startswith(b"BM") and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(handle.read(40))
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff(handle)
    if head[:1] == b"P" and head[1:2] in b"123456":
        return _pnm(handle.read(1024))
    return None


def _png(head: bytes) -> tuple[int, int]:
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise HeaderError("PNG without an IHDR header")
    return struct.unpack(">II", head[16:24])


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(handle: BinaryIO) -> tuple[int, int]:
    handle.seek(2)
    for _ in range(10_000):           # segments before the frame header (EXIF, ICC, ...)
        byte = handle.read(1)
        if not byte:
            break
        if byte != b"\xff":
            continue
        marker = handle.read(1)
        while marker == b"\xff":
            marker = handle.read(1)
        if not marker:
            break
        code = marker[0]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            continue                  # markers without a length
        if code == 0xD9:
            break
        raw = handle.read(2)
        if len(raw) < 2:
            break
        length = struct.unpack(">H", raw)[0]
        if code in _SOF:
            body = handle.read(5)
            if len(body) < 5:
                break
            height, width = struct.unpack(">HH", body[1:5])
            return width, height
        if length < 2:
            break
        handle.seek(length - 2, 1)
    raise HeaderError("JPEG without a frame header")


def _webp(chunk: bytes) -> tuple[int, int]:
    kind = chunk[12:16]
    if kind == b"VP8X" and len(chunk) >= 30:
        return (int.from_bytes(chunk[24:27], "little") + 1, int.from_bytes(chunk[27:30], "little") + 1)
    if kind == b"VP8L" and len(chunk) >= 25:
        bits = int.from_bytes(chunk[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and len(chunk) >= 30:
        width, height = struct.unpack("<HH", chunk[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise HeaderError("WebP without a VP8/VP8L/VP8X header")


def _tiff(handle: BinaryIO) -> tuple[int, int]:
    order = "<" if handle.read(2) == b"II" else ">"
    handle.seek(4)
    raw = handle.read(4)
    if len(raw) < 4:
        raise HeaderError("TIFF without an image directory")
    handle.seek(struct.unpack(order + "I", raw)[0])
    raw = handle.read(2)
    if len(raw) < 2:
        raise HeaderError("TIFF without an image directory")
    size = {}
    for _ in range(min(struct.unpack(order + "H", raw)[0], 4096)):
        entry = handle.read(12)
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            value = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])
            size[tag] = value[0]
    if 256 not in size or 257 not in size:
        raise HeaderError("TIFF without width and height")
    return size[256], size[257]


def _pnm(head: bytes) -> tuple[int, int]:
    fields = []
    for line in head[2:].split(b"\n"):
        fields.extend(line.split(b"#")[0].split())
        if len(fields) >= 2:
            break
    try:
        return int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        raise HeaderError("PNM without width and height") from None
