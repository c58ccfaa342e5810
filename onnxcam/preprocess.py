"""Images in: read photo files and preprocess them as the model expects.

Preprocessing: x = (resize(image, size) * scale - mean) / std in the model's colour order and layout.
Defaults come from the model's ``onnxcam.preprocess`` metadata; every field can be overridden.
"""
from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from ._lazy import cv2
import numpy as np

from . import layouts
from .errors import OnnxcamError
from .image_header import DEFAULT_MAX_PIXELS, HeaderError, image_size

LAYOUTS = ("NCHW", "NHWC")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# The usual conventions, x = (pixel * scale - mean) / std per channel (``--preset NAME``).
PRESETS: dict[str, dict] = {
    "imagenet": dict(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), color="RGB"),
    "tf": dict(scale=1 / 127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0), color="RGB"),   # [-1, 1]
    "caffe": dict(scale=1.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), color="BGR"),
    "paddle": dict(scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), color="RGB"),  # [-1, 1]
    "raw": dict(scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), color="RGB"),          # 0-255
    "unit": dict(scale=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), color="RGB"),     # 0-1
}


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the model's input tensor."""
    size: tuple[int, int] | None = None          # (height, width); None: keep the image size
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    color: str = "RGB"
    layout: str = "NCHW"

    def with_preset(self, name: str) -> "Preprocessing":
        """This preprocessing with a named convention's scale, mean, std and colour order."""
        key = name.lower()
        if key not in PRESETS:
            raise OnnxcamError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(self, **PRESETS[key])

    def explainer_layout(self, input_rank: int | None) -> str | None:
        """The layout the Explainer must use with inputs made by this preprocessing: the images' own for
        a rank-4 (image) model, else None (arrays come in the model's layout, which layouts.py reads)."""
        return self.layout if input_rank == 4 else None

    @classmethod
    def from_metadata(cls, metadata: dict | None, input_shape: tuple | None = None) -> "Preprocessing":
        """Metadata values when present, else what the input shape says (layout, static size)."""
        base = cls()
        if input_shape is not None and len(input_shape) == 4:   # images: the one layout guesser decides
            base = replace(base, layout="NHWC" if layouts.input_layout(input_shape) == layouts.LAST else "NCHW")
        size = static_size(input_shape, base.layout)
        if size:
            base = replace(base, size=size)
        if not metadata:
            return base
        fields = {}
        if "size" in metadata:
            fields["size"] = _int_pair(metadata["size"])
        for key in ("mean", "std"):
            if key in metadata:
                fields[key] = tuple(float(v) for v in metadata[key])
        if "scale" in metadata:
            fields["scale"] = float(metadata["scale"])
        if "color" in metadata:
            fields["color"] = str(metadata["color"]).upper()
        if "layout" in metadata:
            fields["layout"] = str(metadata["layout"]).upper()
        return replace(base, **fields).validated()

    def validated(self) -> "Preprocessing":
        if self.layout not in LAYOUTS:
            raise OnnxcamError(f"unknown layout {self.layout!r}; use NCHW or NHWC")
        if self.color not in ("RGB", "BGR"):
            raise OnnxcamError(f"unknown colour order {self.color!r}; use RGB or BGR")
        if len(self.mean) != len(self.std):
            raise OnnxcamError(f"--mean has {len(self.mean)} values but --std has {len(self.std)}; "
                               "give one value per channel to both")
        for name, values in (("--mean", self.mean), ("--std", self.std), ("--scale", (self.scale,))):
            if not all(math.isfinite(v) for v in values):
                raise OnnxcamError(f"{name} {', '.join(map(str, values))} must be finite numbers")
        if any(s == 0 for s in self.std):
            raise OnnxcamError("--std contains 0; every standard deviation must be non-zero")
        if self.size is not None and min(self.size) <= 0:
            raise OnnxcamError(f"--size {self.size} must be positive")
        return self

    def probe_shape(self, input_shape: tuple | None) -> tuple | None:
        """Batch-1 shape of a rank-4 model input at this preprocessing's size (for the one probe run
        that measures layer shapes when the model's spatial axes are symbolic)."""
        if input_shape is None or len(input_shape) != 4 or self.size is None:
            return None
        channels = input_shape[1] if self.layout == "NCHW" else input_shape[3]
        if not isinstance(channels, int) or channels <= 0:
            channels = len(self.mean)
        h, w = self.size
        return (1, channels, h, w) if self.layout == "NCHW" else (1, h, w, channels)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """One RGB uint8 image (H, W, 3) -> float32 array (C, h, w) or (h, w, C) without batch axis."""
        image = rgb if self.color == "RGB" else rgb[..., ::-1]
        if self.size is not None and tuple(image.shape[:2]) != tuple(self.size):
            image = cv2.resize(image, (self.size[1], self.size[0]), interpolation=cv2.INTER_LINEAR)
        x = image.astype(np.float32) * np.float32(self.scale)
        channels = x.shape[-1]
        if len(self.mean) not in (1, channels):
            raise OnnxcamError(f"--mean has {len(self.mean)} values for a {channels}-channel image")
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = np.transpose(x, (2, 0, 1))
        return np.ascontiguousarray(x, dtype=np.float32)


def _int_pair(value) -> tuple[int, int]:
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def static_size(shape: tuple | None, layout: str) -> tuple[int, int] | None:
    if shape is None or len(shape) != 4:
        return None
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return (h, w)
    return None


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 (H, W, 3); a one-line error for a missing, unreadable, oversized or non-image file.

    The size is read from the file header and checked against ``max_pixels`` before OpenCV decodes
    anything (None: no limit), so a decompression bomb costs a few bytes of reading. Grayscale images
    give three equal channels; an alpha channel is dropped (as PIL's ``convert("RGB")`` does); 16-bit
    images are scaled to 8 bits with rounding (v * 255 / 65535), the same for every format (OpenCV's own
    8-bit decoding truncates PNGs but rounds TIFFs)."""
    path = Path(path)
    data = read_regular_file(path, 8 * max_pixels + (1 << 20) if max_pixels else None)
    if max_pixels:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(int(max_pixels)))  # backstop, read once
        try:
            size = image_size(io.BytesIO(data))
        except HeaderError as exc:
            raise OnnxcamError(f"input {path} is not a readable image ({exc})") from None
        if size is not None and size[0] * size[1] > max_pixels:
            raise OnnxcamError(f"input {path} declares {size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} "
                               f"megapixels), over the limit of {max_pixels / 1e6:g}; raise --max-pixels "
                               "if the image is genuine")
    try:
        buffer = np.frombuffer(data, dtype=np.uint8)
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if buffer.size else None
        if image is not None and image.dtype == np.uint16:
            image = np.rint(image / 257.0).astype(np.uint8)        # 65535 / 255 = 257
        if image is not None and image.dtype == np.uint8:
            cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    except MemoryError:
        raise OnnxcamError(f"not enough memory to decode {path}; lower --max-pixels or free memory") from None
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise OnnxcamError(f"input {path} is over OpenCV's pixel limit (OPENCV_IO_MAX_IMAGE_PIXELS="
                               f"{os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS', 'default')}, fixed at the first "
                               "image this process read); raise it in the environment") from None
        if "Insufficient memory" in str(exc):
            raise OnnxcamError(f"not enough memory to decode {path}; lower --max-pixels or free memory") from None
        raise OnnxcamError(f"input {path} is not a readable image ({_cv2_reason(exc)})") from None
    if image is None:
        raise OnnxcamError(f"input {path} is not a readable image (PNG, JPEG, BMP, TIFF, WebP); "
                           "pass an image file, or a .npy array for non-image models")
    if image.dtype != np.uint8:
        raise OnnxcamError(f"input {path} has {image.dtype} pixels; onnxcam reads 8- and 16-bit images, "
                           "so convert it (or pass a .npy array already preprocessed)")
    return image


def read_regular_file(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file; one-line errors for missing paths, folders, FIFOs and devices
    (opened non-blocking, so a FIFO never hangs) and unreadable files."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise OnnxcamError(f"input {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise OnnxcamError(f"input {path} is a directory; pass image files") from None
    except OSError as exc:
        raise OnnxcamError(f"cannot read input {path} ({exc.strerror}); check its permissions") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise OnnxcamError(f"input {path} is a directory; pass image files")
        if not stat.S_ISREG(mode):
            raise OnnxcamError(f"input {path} is not a regular file (a FIFO, socket or device); "
                               "pass image or .npy files")
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise OnnxcamError(f"input {path} is {size / 1e6:.0f} MB, larger than any image within the pixel "
                               "limit; raise --max-pixels if it is genuine")
        try:
            return handle.read()
        except MemoryError:
            raise OnnxcamError(f"not enough memory to read {path}") from None
        except OSError as exc:
            raise OnnxcamError(f"cannot read input {path} ({exc.strerror})") from None


def _cv2_reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    reason = next((line.split(")", 1)[-1].strip(" :") for line in text if "error:" in line), "")
    return reason or "OpenCV cannot decode it"
