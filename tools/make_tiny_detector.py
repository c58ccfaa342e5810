"""Train the small YOLO-style detector (tools/tiny_yolo.py, yolov8 head) on the synthetic shapes data
and export it to ONNX with the shapes preprocessing and class names in its metadata.

Targets: each image's one shape is assigned to the cell holding its centre at both scales (strides 8
and 16); those predictions learn the box (L1 on cx, cy, w, h over the image size) and the one-hot
class, every other prediction learns class scores of 0 (binary cross-entropy). Prints the held-out
rate at which the best detection has the right class and IoU >= 0.5 with the true box.

    PYTHONPATH=. python tools/make_tiny_detector.py --out .cache/models/shapes_yolo.onnx
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_data  # noqa: E402
from tiny_yolo import TinyYolo  # noqa: E402
from torch_export import add_metadata, export_legacy  # noqa: E402

from onnxcam import detection  # noqa: E402


def assigned(boxes: np.ndarray) -> np.ndarray:
    """(n, 2) prediction indices of each box's centre cell at strides 8 and 16."""
    size = shapes_data.IMAGE_SIZE
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    found, offset = [], 0
    for stride in (8, 16):
        cells = size // stride
        gx, gy = np.minimum(cx // stride, cells - 1), np.minimum(cy // stride, cells - 1)
        found.append(offset + gy * cells + gx)
        offset += cells * cells
    return np.stack(found, 1).astype(np.int64)


def loss(out: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    n, rows, _ = out.shape
    size = float(shapes_data.IMAGE_SIZE)
    target_classes = torch.zeros_like(out[:, 4:])
    box_loss = 0.0
    xyxy = boxes.float()
    truth = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                         xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1) / size
    for k in range(where.shape[1]):
        picked = out[torch.arange(n), :, where[:, k]]                   # (n, 4+K)
        box_loss = box_loss + (picked[:, :4] / size - truth).abs().sum(1).mean()
        target_classes[torch.arange(n), labels, where[:, k]] = 1.0
    scores = out[:, 4:].clamp(1e-6, 1 - 1e-6)
    weights = 1.0 + 20.0 * target_classes.amax(1, keepdim=True)          # positives count more
    class_loss = (F.binary_cross_entropy(scores, target_classes, reduction="none") * weights).mean()
    return box_loss + 10.0 * class_loss


def held_out_rate(model: TinyYolo, images, labels, boxes) -> float:
    with torch.no_grad():
        raw = model(torch.from_numpy(shapes_data.preprocess(images))).numpy()
    hits = 0
    for r, label, box in zip(raw, labels, boxes):
        found = detection.detections(r, "yolov8")
        if found and found[0].class_id == label and \
                detection.iou(np.array(found[0].box), box[None].astype(float))[0] >= 0.5:
            hits += 1
    return hits / len(raw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/models/shapes_yolo.onnx"))
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    images, labels, boxes = shapes_data.make_dataset(6000, shapes_data.TRAIN_SEED)
    x = torch.from_numpy(shapes_data.preprocess(images))
    where = torch.from_numpy(assigned(boxes))
    y, b = torch.from_numpy(labels), torch.from_numpy(boxes)
    model = TinyYolo("yolov8", classes=len(shapes_data.CLASS_NAMES), width=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=args.steps)
    rng = np.random.default_rng(0)
    for step in range(args.steps):
        batch = torch.from_numpy(rng.choice(len(x), 64, replace=False))
        value = loss(model(x[batch]), b[batch], y[batch], where[batch])
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step}/{args.steps} loss {value.item():.4f} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    model.eval()
    test = shapes_data.make_dataset(500, shapes_data.HELD_OUT_SEED)
    rate = held_out_rate(model, *test)
    print(f"held-out: best detection right class and IoU >= 0.5 for {rate:.4f} of 500 images")
    export_legacy(model, x[:1], args.out)
    add_metadata(args.out, {"onnxcam.preprocess": shapes_data.PREPROCESS,
                            "onnxcam.class_names": shapes_data.CLASS_NAMES,
                            "onnxcam.shapes_detection_rate": f"{rate:.4f}"})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
