"""Train the small shapes CNN and export it to models/shapes_cnn.onnx.

The architecture is made for CAM: Conv/BatchNorm/ReLU blocks ending in a conv block at 16x16, then
global average pooling, Flatten and one Linear layer. Before exporting, the tool checks with a plain
torch Grad-CAM (autograd) that the map's peak falls inside the true box of a held-out set, and fails
if accuracy or localisation is below the bar.

    python tools/make_shapes_model.py [--out models/shapes_cnn.onnx]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_data  # noqa: E402
from torch_export import add_metadata, export_legacy  # noqa: E402

TRAIN_SIZE = 6000
VALIDATION_SIZE = 1000
HELD_OUT_SIZE = 2000
EPOCHS = 8
BATCH_SIZE = 64
MIN_ACCURACY = 0.95
MIN_LOCALISATION = 0.95


def conv_block(in_channels: int, out_channels: int, pool: bool, stride: int = 1) -> nn.Sequential:
    layers = [
        ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)),
        ("bn", nn.BatchNorm2d(out_channels)),
        ("relu", nn.ReLU()),
    ]
    if pool:
        layers.append(("pool", nn.MaxPool2d(2)))
    return nn.Sequential(OrderedDict(layers))


class ShapesCNN(nn.Module):
    """64x64 RGB -> 5 logits; ``block4`` (48 channels at 16x16) is the layer to explain."""

    def __init__(self, num_classes: int = len(shapes_data.CLASS_NAMES)):
        super().__init__()
        self.block1 = conv_block(3, 16, pool=True)
        self.block2 = conv_block(16, 32, pool=True)
        self.block3 = conv_block(32, 48, pool=False)
        self.block4 = conv_block(48, 48, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(self.flatten(self.pool(x)))


def train(model: ShapesCNN, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
    x = torch.from_numpy(shapes_data.preprocess(images))
    y = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    steps_per_epoch = (len(x) + BATCH_SIZE - 1) // BATCH_SIZE
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=EPOCHS * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            inputs = x[batch]
            if torch.rand((), generator=generator) < 0.5:  # mirrored shapes are the same shapes
                inputs = inputs.flip(-1)
            loss = loss_fn(model(inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total / len(x):.4f}", flush=True)


@torch.no_grad()
def accuracy(model: ShapesCNN, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(shapes_data.preprocess(images)))
    return float((logits.argmax(1).numpy() == labels).mean())


def grad_cam_peaks(model: ShapesCNN, images: np.ndarray, layer: nn.Module) -> np.ndarray:
    """(N, 2) (x, y) of each Grad-CAM peak at input resolution, for the arg-max class, on the
    output of ``layer``; the map is made as pytorch-grad-cam does (relu, min-max, bilinear resize)."""
    model.eval()
    captured = {}
    handle = layer.register_forward_hook(lambda module, args, output: captured.__setitem__("a", output))
    try:
        logits = model(torch.from_numpy(shapes_data.preprocess(images)))
    finally:
        handle.remove()
    activations = captured["a"]
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    gradients = torch.autograd.grad(score, activations)[0]
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((weights * activations).sum(1)).detach().numpy()
    height, width = images.shape[1:3]
    peaks = np.empty((len(maps), 2), np.int64)
    for i, cam in enumerate(maps):
        cam = cam - cam.min()
        cam = cam / (cam.max() + 1e-7)
        cam = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
        y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
        peaks[i] = (x, y)
    return peaks


def peak_in_box_rate(peaks: np.ndarray, boxes: np.ndarray) -> float:
    x, y = peaks[:, 0], peaks[:, 1]
    inside = (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])
    return float(inside.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "shapes_cnn.onnx")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a 2x slowdown on CPU, not needed here
    torch.set_num_threads(2)
    started = time.perf_counter()
    train_set = shapes_data.make_dataset(TRAIN_SIZE, shapes_data.TRAIN_SEED)
    validation_set = shapes_data.make_dataset(VALIDATION_SIZE, shapes_data.VALIDATION_SEED)
    held_out_images, held_out_labels, held_out_boxes = shapes_data.make_dataset(HELD_OUT_SIZE, shapes_data.HELD_OUT_SEED)
    print(f"data: {time.perf_counter() - started:.1f}s", flush=True)

    model = ShapesCNN()
    train(model, train_set[0], train_set[1], seed=0)
    print(f"trained: {time.perf_counter() - started:.1f}s", flush=True)

    validation_accuracy = accuracy(model, validation_set[0], validation_set[1])
    held_out_accuracy = accuracy(model, held_out_images, held_out_labels)
    localisation = {
        name: peak_in_box_rate(grad_cam_peaks(model, held_out_images, layer), held_out_boxes)
        for name, layer in (("block4.relu", model.block4.relu), ("block4.bn", model.block4.bn))
    }
    print(f"validation accuracy {validation_accuracy:.4f}, held-out accuracy {held_out_accuracy:.4f}")
    print("Grad-CAM peak inside the true box (held-out): "
          + ", ".join(f"{name} {rate:.4f}" for name, rate in localisation.items()))
    if held_out_accuracy < MIN_ACCURACY or min(localisation.values()) < MIN_LOCALISATION:
        sys.exit(f"not exported: the model is below the bar (accuracy >= {MIN_ACCURACY}, "
                 f"localisation >= {MIN_LOCALISATION})")

    example = torch.from_numpy(shapes_data.preprocess(held_out_images[:1]))
    export_legacy(model, example, args.out)
    add_metadata(args.out, {
        "onnxcam.preprocess": shapes_data.PREPROCESS,
        "onnxcam.class_names": shapes_data.CLASS_NAMES,
        "onnxcam.shapes_accuracy": f"{held_out_accuracy:.4f}",
        "onnxcam.shapes_localisation": f"{localisation['block4.relu']:.4f}",
    })
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
