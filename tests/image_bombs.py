"""Large and malicious PNGs made in the tests: a real decompression bomb (a few hundred KB of zlib
inflating to gigabytes) and a large but genuine-looking photo-sized PNG."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def write_png(path: Path, width: int, height: int, row=None, level: int = 9) -> Path:
    """An 8-bit RGB PNG streamed row by row (never held in memory): every row is ``row(y)`` (bytes of
    3 * width), zeros when None."""
    zero = b"\x00" * (3 * width)
    z = zlib.compressobj(level)
    parts = []
    for y in range(height):
        parts.append(z.compress(b"\x00" + (row(y) if row else zero)))
    parts.append(z.flush())
    data = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data)
                           + _chunk(b"IEND", b""))
    return Path(path)


def write_bomb(path: Path, width: int, height: int, rows_per_block: int = 50) -> Path:
    """An all-black RGB PNG of width x height, made in milliseconds whatever its size: one deflate
    block of ``rows_per_block`` zero rows, ended by a full flush (so it references nothing before it),
    repeated; the Adler-32 of n zero bytes is (n mod 65521) << 16 | 1."""
    if height % rows_per_block:
        raise ValueError("height must be a multiple of rows_per_block")
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = raw.compress(b"\x00" * ((3 * width + 1) * rows_per_block)) + raw.flush(zlib.Z_FULL_FLUSH)
    n = (3 * width + 1) * height
    stream = (b"\x78\xda" + block * (height // rows_per_block) + b"\x03\x00"
              + struct.pack(">I", ((n % 65521) << 16) | 1))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream)
                           + _chunk(b"IEND", b""))
    return Path(path)
