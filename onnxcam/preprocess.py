"""Images in: read photo files and preprocess them as the model expects.

Preprocessing: x = (resize(image, size) * scale - mean) / std in the model's colour order and layout.
Defaults come from the model's ``onnxcam.preprocess`` metadata; every field can be overridden.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ._lazy import cv2
import numpy as np

from . import layouts
from .errors import OnnxcamError

LAYOUTS = ("NCHW", "NHWC")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the model's input tensor."""
    size: tuple[int, int] | None = None          # (height, width); None: keep the image size
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    color: str = "RGB"
    layout: str = "NCHW"

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


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); a one-line error for a missing or non-image file.

    Grayscale images give three equal channels; an alpha channel is dropped (as PIL's
    ``convert("RGB")`` does); 16-bit images are scaled to 8 bits with rounding (v * 255 / 65535), the
    same for every format (OpenCV's own 8-bit decoding truncates PNGs but rounds TIFFs)."""
    path = Path(path)
    if not path.exists():
        raise OnnxcamError(f"input {path} does not exist; check the path")
    if path.is_dir():
        raise OnnxcamError(f"input {path} is a directory; pass image files")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise OnnxcamError(f"input {path} is not a readable image (PNG, JPEG, BMP, TIFF, WebP); "
                           "pass an image file, or a .npy array for non-image models")
    if image.dtype == np.uint16:
        image = np.rint(image / 257.0).astype(np.uint8)        # 65535 / 255 = 257
    elif image.dtype != np.uint8:
        raise OnnxcamError(f"input {path} has {image.dtype} pixels; onnxcam reads 8- and 16-bit images, "
                           "so convert it (or pass a .npy array already preprocessed)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
