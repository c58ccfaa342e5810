"""Pictures out, for people: heatmap overlays on photos, labelled grids, and plots of 1D/2D/3D maps.

Colouring follows pytorch-grad-cam: OpenCV's JET colormap of the [0, 1] map, blended with the photo.
"""
from __future__ import annotations

from ._lazy import cv2
import numpy as np

from .errors import OnnxcamError


def jet_heatmap(cam: np.ndarray) -> np.ndarray:
    """RGB uint8 JET colouring of a [0, 1] map (OpenCV's colormap, as pytorch-grad-cam uses)."""
    scaled = np.uint8(np.clip(cam, 0.0, 1.0) * 255)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


STRIP_ROWS = 256   # rows of the photo coloured and blended at a time


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``(1 - alpha) * image + alpha * JET(map)`` at the original image size (uint8 RGB).

    The map is resized bilinearly in float32 (half-pixel centres, OpenCV's INTER_LINEAR) and coloured
    as pytorch-grad-cam does (``applyColorMap(uint8(255 * map))``), but a strip of rows at a time:
    the only full-size buffer is the result, so an overlay costs about one image's bytes beyond the
    image (a whole-image float32 blend would cost ~12x)."""
    if not 0.0 <= alpha <= 1.0:
        raise OnnxcamError(f"--alpha {alpha} must lie in [0, 1]")
    height, width = rgb.shape[:2]
    photo = np.ascontiguousarray(rgb, np.uint8)
    cam = np.clip(np.nan_to_num(np.asarray(cam, np.float32), nan=0.0), 0.0, 1.0)
    # separable bilinear resize: the width now (map rows x photo width is small), the height per strip
    wide = cam if cam.shape[1] == width else cv2.resize(cam, (width, cam.shape[0]), interpolation=cv2.INTER_LINEAR)
    rows = cam.shape[0]
    position = np.clip((np.arange(height, dtype=np.float64) + 0.5) * rows / height - 0.5, 0, rows - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, rows - 1)
    frac = (position - low).astype(np.float32)[:, None]
    out = np.empty_like(photo)
    for top in range(0, height, STRIP_ROWS):
        part = slice(top, min(top + STRIP_ROWS, height))
        strip = wide[low[part]] if rows == height else wide[low[part]] * (1 - frac[part]) + wide[high[part]] * frac[part]
        heat = cv2.applyColorMap(np.uint8(255 * np.clip(strip, 0.0, 1.0)), cv2.COLORMAP_JET)
        cv2.cvtColor(heat, cv2.COLOR_BGR2RGB, dst=heat)
        cv2.addWeighted(photo[part], 1.0 - alpha, heat, alpha, 0.0, dst=out[part])
    return out


GRID_MAX_SIDE = 1024


def fit_for_grid(rgb: np.ndarray, max_side: int = GRID_MAX_SIDE) -> np.ndarray:
    """The photo downscaled (area averaging) so its longer side is at most ``max_side``: a grid of
    full-size panels of a large photo would cost (methods + 1) x its bytes and show nothing more."""
    height, width = rgb.shape[:2]
    factor = max_side / max(height, width)
    if factor >= 1:
        return rgb
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def label_panel(image: np.ndarray, text: str) -> np.ndarray:
    """The image with a caption strip above it (for side-by-side grids)."""
    strip = np.full((24, image.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text[: max(1, image.shape[1] // 9)], (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, image], axis=0)


def grid(panels: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Panels of one size laid out in rows, padded white."""
    h, w = panels[0].shape[:2]
    rows = -(-len(panels) // columns)
    canvas = np.full((rows * h, min(columns, len(panels)) * w, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = panel
    return canvas


_PLOT_HEIGHT, _PLOT_WIDTH = 256, 768


def _signal_for(x: np.ndarray, length: int) -> np.ndarray:
    """The first channel of a (C, L) or (L, C) signal whose length matches the map."""
    if x.ndim == 1:
        return x
    return x[0] if x.shape[-1] == length else x[..., 0]


def _plot_signal(signal: np.ndarray, cam: np.ndarray | None) -> np.ndarray:
    canvas = np.full((_PLOT_HEIGHT, _PLOT_WIDTH, 3), 255, np.uint8)
    if cam is not None:
        band = jet_heatmap(cv2.resize(cam[None, :].astype(np.float32), (_PLOT_WIDTH, 1)))
        canvas[-24:] = np.repeat(band, 24, axis=0)
    values = signal.astype(np.float64)
    span = values.max() - values.min()
    ys = (values - values.min()) / (span if span > 0 else 1.0)
    xs = np.linspace(0, _PLOT_WIDTH - 1, len(values))
    points = np.stack([xs, (1 - ys) * (_PLOT_HEIGHT - 40) + 8], axis=1).astype(np.int32)
    cv2.polylines(canvas, [points], False, (20, 20, 20), 1, cv2.LINE_AA)
    return canvas


def _to_panel(gray: np.ndarray) -> np.ndarray:
    side = _PLOT_HEIGHT
    return cv2.resize(gray, (side, side), interpolation=cv2.INTER_NEAREST)


def _normalized(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32)
    span = float(values.max() - values.min())
    return (values - values.min()) / (span if span > 0 else 1.0)


def _mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    d, h, w = volume.shape
    return [volume[d // 2], volume[:, h // 2, :], volume[:, :, w // 2]]


def render_map(x: np.ndarray, cam: np.ndarray | None) -> np.ndarray:
    """A picture of a non-photo input and its map: a line plot with a heat band for 1D signals, the
    heatmap for 2D arrays, and the three mid-slices for 3D volumes (RGB uint8)."""
    spatial = cam.ndim if cam is not None else max(1, x.ndim - 1)
    if spatial == 1:
        length = cam.shape[0] if cam is not None else max(x.shape)
        return _plot_signal(_signal_for(x, length), cam)
    if spatial == 2:
        if cam is None:
            gray = np.uint8(_normalized(x[0] if x.shape[0] <= 4 else x[..., 0]) * 255)
            return cv2.cvtColor(_to_panel(gray), cv2.COLOR_GRAY2RGB)
        return _to_panel(jet_heatmap(cam))
    if cam is None:
        volume = x[0] if x.ndim == 4 else x
        return np.concatenate([cv2.cvtColor(_to_panel(np.uint8(_normalized(s) * 255)), cv2.COLOR_GRAY2RGB)
                               for s in _mid_slices(volume)], axis=1)
    return np.concatenate([_to_panel(jet_heatmap(s)) for s in _mid_slices(cam)], axis=1)


def render_input(x: np.ndarray) -> np.ndarray:
    return render_map(x, None)
