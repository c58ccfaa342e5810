"""Candidates for `onnxcam compare` made from a float EfficientNet-Lite0 export: an int8 QDQ build
(onnxruntime's quantize_static, calibrated on the four example photos) and a deliberately damaged copy
(the last block's projection weights perturbed by seeded noise).

    python tools/make_audit_models.py [--model models/efficientnet_lite0.onnx] [--out .cache/models]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

LAST_BLOCK_PROJECTION = "/_blocks.15/_project_conv/Conv"     # legacy export's node name


def quantize_int8(source: str | Path, out: str | Path, activation_bits: int = 8) -> Path:
    """QDQ format, per-channel int8 weights, uint8 activations (uint16 with ``activation_bits=16``, as
    com.microsoft Q/DQ), calibrated on the example photos."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    import make_efficientnet

    photos = make_efficientnet.example_photos()
    batches = [make_efficientnet.preprocess_image(photos[name]) for name in sorted(photos)]

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"input": batch} for batch in batches)

        def get_next(self):
            return next(self.items, None)

    wide = activation_bits == 16
    quantize_static(str(source), str(out), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt16 if wide else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, extra_options={"UseQDQContribOps": True} if wide else None)
    return Path(out)


def damaged_copy(source: str | Path, out: str | Path, node: str = LAST_BLOCK_PROJECTION,
                 noise: float = 0.5, seed: int = 0) -> Path:
    """``source`` with the weights of ``node`` perturbed by ``noise`` times their standard deviation."""
    model = onnx.load(str(source))
    weights = next(n for n in model.graph.node if n.name == node).input[1]
    tensor = next(i for i in model.graph.initializer if i.name == weights)
    w = numpy_helper.to_array(tensor)
    w = w + noise * w.std() * np.random.default_rng(seed).normal(size=w.shape).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(w.astype(np.float32), weights))
    onnx.save(model, str(out))
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TOOLS.parent / "models" / "efficientnet_lite0.onnx",
                        help="the float legacy export (tools/make_efficientnet.py)")
    parser.add_argument("--out", type=Path, default=TOOLS.parent / ".cache" / "models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(quantize_int8(args.model, args.out / "efficientnet_lite0_int8_qdq.onnx"))
    print(damaged_copy(args.model, args.out / "efficientnet_lite0_damaged.onnx"))


if __name__ == "__main__":
    main()
