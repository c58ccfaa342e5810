"""Small seeded transformers in torch for the token tests, with torchvision's VisionTransformer layout
and module names (torchvision itself does not import next to the test environment's torch 2.13):
``conv_proj`` patch conv, ``class_token``, ``encoder.pos_embedding``, blocks
``encoder.layers.encoder_layer_i`` = ln_1 → self_attention → residual → ln_2 → mlp → residual,
``encoder.ln``, ``heads.head`` on the class token; attention is a batch-first nn.MultiheadAttention
called as torchvision calls it (``need_weights=False``), which torchcam's LeGrad hooks.

Also a Swin-style net whose stage outputs are channels-last (N, H, W, C) and (N, H·W, C)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens: int, dim: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.5)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads, mlp)) for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class TinyViT(nn.Module):
    """ViT on (3, H, W) images with ``patch``-sized patches, a class token and ``registers`` extra
    prefix tokens (so T = 1 + registers + (H/patch)(W/patch))."""

    def __init__(self, size=(32, 48), patch: int = 8, dim: int = 24, depth: int = 2, heads: int = 3,
                 mlp: int = 48, classes: int = 5, registers: int = 0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.grid = (size[0] // patch, size[1] // patch)
        self.prefix = 1 + registers
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1 + registers, dim))
        self.encoder = Encoder(self.prefix + self.grid[0] * self.grid[1], dim, depth, heads, mlp)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))

    def forward(self, x):
        n = x.shape[0]
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def vit_reshape_transform(tensor: torch.Tensor, height: int, width: int, prefix: int = 1) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT reshape_transform (tutorial ``vit_example.py``), with the
    prefix count as a parameter."""
    result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


class SwinStyle(nn.Module):
    """Patch conv, then stages on channels-last tokens: ``stage1`` outputs (N, H, W, C), ``stage2``
    (N, H·W, C) after patch merging; mean over the tokens, linear head."""

    def __init__(self, seed: int = 0, classes: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.stage1 = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 12), nn.GELU())
        self.merge = nn.Linear(4 * 12, 16)
        self.stage2 = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        a = self.stage1(self.patch(x).permute(0, 2, 3, 1))                 # (N, H, W, 12)
        n, h, w, c = a.shape
        merged = a.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c)
        b = self.stage2(self.merge(merged).reshape(n, (h // 2) * (w // 2), 16))   # (N, H/2·W/2, 16)
        return self.head(b.mean(1))


def photo_batch(size, n: int = 2, seed: int = 0) -> np.ndarray:
    """Real photos (skimage.data) resized to ``size`` and standardised, NCHW float32."""
    import cv2
    from skimage import data
    photos = [data.astronaut(), data.chelsea(), data.coffee()][:n]
    batch = [cv2.resize(p, (size[1], size[0]), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
             for p in photos]
    x = np.stack(batch).transpose(0, 3, 1, 2)
    return ((x - 0.45) / 0.25).astype(np.float32)
