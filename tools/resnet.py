"""A ResNet-50-sized network with seeded random weights, for benchmarks (no torchvision needed).

Same architecture and module names as torchvision's ``resnet50`` (bottleneck blocks [3, 4, 6, 3],
stride on the 3x3 conv, widths 64-128-256-512 ×4), so node names in the ONNX export read like a real
ResNet-50's (``/layer4/layer4.2/relu_2/Relu``) and its cost is a real ResNet-50's. BatchNorm scales and
shifts are drawn from a seeded generator and the running statistics are calibrated on a seeded random
batch, so activations stay in a sane range through all 16 blocks and the logits are not degenerate.

    python tools/resnet.py --out .cache/models/resnet50_random.onnx
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

LAYERS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, width: int, stride: int = 1):
        super().__init__()
        out = width * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (blocks, width) in enumerate(zip(LAYERS, WIDTHS), start=1):
            stride = 1 if index == 1 else 2
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(inplanes, width, stride if block == 0 else 1))
                inplanes = width * EXPANSION
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@torch.no_grad()
def _seed_weights(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_out) ** 0.5)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.6 + 0.4)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        elif isinstance(module, nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.05)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.01)


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, generator: torch.Generator, batch: int = 4, size: int = 224) -> None:
    """Running statistics from one seeded random batch (cumulative average: exactly that batch's stats)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    model(torch.randn(batch, 3, size, size, generator=generator))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    model.eval()


def build_resnet50_torch(seed: int = 0, num_classes: int = 1000) -> ResNet50:
    """The ResNet-50-sized net in eval mode, weights and BatchNorm statistics fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model = ResNet50(num_classes)
    _seed_weights(model, generator)
    _calibrate_batchnorm(model, generator)
    return model


def export_resnet50(path: str | Path, seed: int = 0, size: int = 224) -> Path:
    """Legacy-exporter ONNX (opset 17, dynamic batch, input 'input', output 'logits')."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_export import export_legacy

    model = build_resnet50_torch(seed)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return export_legacy(model, example, path, opset=17)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/models/resnet50_random.onnx")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even when the file exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return 0
    export_resnet50(out, args.seed)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
