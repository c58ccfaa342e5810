"""Cost of Grad-CAM through a recurrent layer (the portable LSTM/GRU/RNN rules), as ratios in one process.

A conv1d -> 2-layer bidirectional LSTM -> mean -> linear classifier (seeded random weights) is exported
with the legacy torch exporter for each sequence length. For each length it prints the time of the first
explain call (building the gradient model and its ONNX Runtime session), and the best-of-rounds time of a
Grad-CAM as a multiple of a plain forward pass of the same model (the two take turns, same threads).

    PYTHONPATH=. .venv/bin/python tools/bench_recurrent.py --lengths 50,200,800 --batch 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from onnxcam import Explainer  # noqa: E402
from torch_export import export_legacy  # noqa: E402


class ConvBiLSTM(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv1d(2, 32, 5, padding=2), torch.nn.ReLU())
        self.lstm = torch.nn.LSTM(32, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = torch.nn.Linear(2 * hidden, 4)

    def forward(self, x):
        seq, _ = self.lstm(self.features(x).transpose(1, 2))
        return self.fc(seq.mean(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="50,200,800", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = ConvBiLSTM(args.hidden).eval()
    print("| length | first explain (build + session) | forward | Grad-CAM | Grad-CAM / forward |")
    print("| --- | --- | --- | --- | --- |")
    for length in (int(v) for v in args.lengths.split(",")):
        x = np.random.default_rng(0).normal(size=(args.batch, 2, length)).astype(np.float32)
        path = export_legacy(net, torch.from_numpy(x[:1]), Path(tempfile.mkdtemp()) / "net.onnx")
        explainer = Explainer(str(path), "features.1", grad_backend="portable", threads=args.threads, cache=False)
        start = time.perf_counter()
        explainer.explain(x, "gradcam")
        first = time.perf_counter() - start
        explainer.forward(x)
        forward, explain = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            explainer.forward(x)
            forward.append(time.perf_counter() - start)
            start = time.perf_counter()
            explainer.explain(x, "gradcam")
            explain.append(time.perf_counter() - start)
        print(f"| {length} | {first:.2f} s | {min(forward) * 1e3:.1f} ms | {min(explain) * 1e3:.1f} ms "
              f"| {min(explain) / min(forward):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
