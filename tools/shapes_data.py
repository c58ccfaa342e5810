"""Synthetic "shapes" data set: one shape per image on a cluttered background.

Each image holds exactly one shape (circle, square, triangle, cross or ring) at a random place, size
and rotation, over clutter that is never a shape: smooth colour noise, pixel noise, thin random lines
and soft blurred blobs. The tight box of the drawn shape is known exactly, so a class activation map
can be checked against it.

Generation is deterministic for a given ``(n, seed)`` and needs only NumPy and OpenCV, so tests can
regenerate any split without torch.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

IMAGE_SIZE = 64
CLASS_NAMES = ["circle", "square", "triangle", "cross", "ring"]
SHAPE_SIZE_RANGE = (16, 28)  # side of the shape's square footprint, in pixels

# Stored in the model's metadata_props as `onnxcam.preprocess`; `preprocess` below implements it.
PREPROCESS = {
    "size": [IMAGE_SIZE, IMAGE_SIZE],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "scale": 1.0 / 255.0,
    "color": "RGB",
    "layout": "NCHW",
}

# Seeds of the splits used by tools/make_shapes_model.py; tests use seeds of their own.
TRAIN_SEED = 0
VALIDATION_SEED = 1
HELD_OUT_SEED = 2

_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(images, labels, boxes)``.

    images: uint8 (n, 64, 64, 3) RGB; labels: int64 (n,), index into CLASS_NAMES (classes are
    balanced: sample i has class i mod 5 before shuffling); boxes: int64 (n, 4) as (x0, y0, x1, y1),
    the tight box of the shape's pixels with x1, y1 exclusive.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(CLASS_NAMES)
    rng.shuffle(labels)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i, label in enumerate(labels):
        images[i], boxes[i] = _make_sample(int(label), rng)
    return images, labels, boxes


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 RGB images (N, H, W, 3) or (H, W, 3) -> float32 NCHW input for the shapes model."""
    batch = images[None] if images.ndim == 3 else images
    height, width = PREPROCESS["size"]
    if batch.shape[1:3] != (height, width):
        batch = np.stack([cv2.resize(im, (width, height), interpolation=cv2.INTER_LINEAR) for im in batch])
    x = batch.astype(np.float32) * np.float32(PREPROCESS["scale"])
    x = (x - np.asarray(PREPROCESS["mean"], np.float32)) / np.asarray(PREPROCESS["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_dataset(out_dir, n: int, seed: int) -> tuple[list, "Path"]:
    """Write ``make_dataset(n, seed)`` as PNG files plus ``boxes.csv`` (file,x1,y1,x2,y2,class, with
    x2, y2 exclusive and the class by name), the form ``onnxcam evaluate --boxes`` reads."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, boxes = make_dataset(n, seed)
    paths, rows = [], ["file,x1,y1,x2,y2,class"]
    for i, (image, label, box) in enumerate(zip(images, labels, boxes)):
        path = out / f"shape_{i:04d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
        paths.append(path)
        rows.append(f"{path.name},{box[0]},{box[1]},{box[2]},{box[3]},{CLASS_NAMES[label]}")
    csv_path = out / "boxes.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return paths, csv_path


def _make_sample(label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = _background(rng)
    size = int(rng.integers(SHAPE_SIZE_RANGE[0], SHAPE_SIZE_RANGE[1] + 1))
    cx = float(rng.uniform(size / 2 + 1, IMAGE_SIZE - size / 2 - 1))
    cy = float(rng.uniform(size / 2 + 1, IMAGE_SIZE - size / 2 - 1))
    angle = float(rng.uniform(0, 2 * math.pi))
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    _draw_shape(mask, CLASS_NAMES[label], cx, cy, size, angle)
    inside = mask > 0
    colour = _contrasting_colour(image[inside].mean(axis=0), rng)
    image[inside] = colour
    ys, xs = np.nonzero(inside)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.int64)
    return image, box


def _background(rng: np.random.Generator) -> np.ndarray:
    """Clutter that carries no shape: smooth colour field, noise, thin lines, soft blobs."""
    coarse = rng.uniform(50, 200, size=(4, 4, 3)).astype(np.float32)
    image = cv2.resize(coarse, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(2, 5))):
        x, y = rng.uniform(0, IMAGE_SIZE, size=2)
        sigma = rng.uniform(3, 7)
        blob = np.exp(-((_GRID_X - x) ** 2 + (_GRID_Y - y) ** 2) / (2 * sigma**2)).astype(np.float32)
        image += blob[..., None] * rng.uniform(-80, 80, size=3).astype(np.float32)
    for _ in range(int(rng.integers(3, 7))):
        p0 = tuple(int(v) for v in rng.integers(-8, IMAGE_SIZE + 8, size=2))
        p1 = tuple(int(v) for v in rng.integers(-8, IMAGE_SIZE + 8, size=2))
        colour = tuple(float(v) for v in rng.uniform(0, 255, size=3))
        cv2.line(image, p0, p1, colour, thickness=1, lineType=cv2.LINE_8)
    image += rng.normal(0, 12, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _contrasting_colour(local_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour far enough from the background under the shape to stay visible."""
    while True:
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - local_mean).sum() >= 150:
            return colour.astype(np.uint8)


def _draw_shape(mask: np.ndarray, name: str, cx: float, cy: float, size: int, angle: float) -> None:
    radius = size / 2
    if name == "circle":
        cv2.circle(mask, (round(cx), round(cy)), round(radius), 255, thickness=-1)
    elif name == "ring":
        thickness = max(2, round(size / 6))
        cv2.circle(mask, (round(cx), round(cy)), round(radius - thickness / 2), 255, thickness=thickness)
    elif name == "square":
        _fill_polygon(mask, _regular_polygon(4, radius, cx, cy, angle))
    elif name == "triangle":
        _fill_polygon(mask, _regular_polygon(3, radius, cx, cy, angle))
    elif name == "cross":
        arm = max(2.0, size / 7)
        for bar_angle in (angle, angle + math.pi / 2):
            _fill_polygon(mask, _rotated_rectangle(cx, cy, radius, arm, bar_angle))
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {CLASS_NAMES}")


def _regular_polygon(sides: int, radius: float, cx: float, cy: float, angle: float) -> np.ndarray:
    turns = angle + 2 * math.pi * np.arange(sides) / sides
    return np.stack([cx + radius * np.cos(turns), cy + radius * np.sin(turns)], axis=1)


def _rotated_rectangle(cx: float, cy: float, half_length: float, half_width: float, angle: float) -> np.ndarray:
    corners = np.array([[-half_length, -half_width], [half_length, -half_width],
                        [half_length, half_width], [-half_length, half_width]])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return corners @ rotation.T + np.array([cx, cy])


def _fill_polygon(mask: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255, lineType=cv2.LINE_8)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a shapes set as PNG files plus boxes.csv.")
    parser.add_argument("--out", default="shapes_eval", help="folder to write into (default: shapes_eval)")
    parser.add_argument("-n", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--seed", type=int, default=777, help="generator seed (default 777, held out)")
    args = parser.parse_args()
    _, boxes_csv = write_dataset(args.out, args.n, args.seed)
    print(boxes_csv)
