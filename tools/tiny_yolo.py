"""A small seeded YOLO-style detector in torch with both raw head layouts.

Backbone of strided convs, two detection scales (strides 8 and 16), per cell one prediction decoded
as YOLOv5/v8 do it (centre = (2·sigmoid(t) - 0.5 + cell) · stride, size = (2·sigmoid(t))² · anchor),
class scores through a sigmoid. ``yolov8`` returns (N, 4+K, A), ``yolov5`` (N, A, 5+K) with an
objectness column."""
from __future__ import annotations

import torch
from torch import nn


class TinyYolo(nn.Module):
    def __init__(self, fmt: str = "yolov8", classes: int = 3, seed: int = 0, width: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.fmt, self.classes = fmt, classes
        out = 4 + classes + (1 if fmt == "yolov5" else 0)
        c1, c2, c3 = 8 * width, 16 * width, 24 * width
        self.backbone = nn.Sequential(
            nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.SiLU())              # stride 8
        self.down = nn.Sequential(nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.SiLU())   # stride 16
        self.head8 = nn.Conv2d(c2, out, 1)
        self.head16 = nn.Conv2d(c3, out, 1)
        self.anchors = (12.0, 28.0)

    def _decode(self, raw, stride: int, anchor: float):
        n, c, h, w = raw.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=raw.dtype), torch.arange(w, dtype=raw.dtype), indexing="ij")
        t = raw.flatten(2)                                                     # (N, c, h*w)
        cx = (2 * torch.sigmoid(t[:, 0]) - 0.5 + xs.flatten()) * stride
        cy = (2 * torch.sigmoid(t[:, 1]) - 0.5 + ys.flatten()) * stride
        bw = (2 * torch.sigmoid(t[:, 2])) ** 2 * anchor
        bh = (2 * torch.sigmoid(t[:, 3])) ** 2 * anchor
        rest = torch.sigmoid(t[:, 4:])
        return torch.cat([torch.stack([cx, cy, bw, bh], 1), rest], 1)         # (N, c, h*w)

    def forward(self, x):
        f8 = self.backbone(x)
        f16 = self.down(f8)
        out = torch.cat([self._decode(self.head8(f8), 8, self.anchors[0]),
                         self._decode(self.head16(f16), 16, self.anchors[1])], 2)   # (N, 4+K(+1), A)
        return out if self.fmt == "yolov8" else out.transpose(1, 2)
