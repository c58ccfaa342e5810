#!/usr/bin/env bash
# The main job from scratch: set up .venv, build the pretrained EfficientNet-Lite0 ONNX model, write the
# example photos, and explain them with Grad-CAM (overlays in demo_out/). Extra arguments go to
# `onnxcam explain`, e.g. `bash tools/demo.sh --method all`.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
make_venv .venv -c tools/constraints-tested.txt -e ".[cpu,tools]"
.venv/bin/python tools/make_efficientnet.py --out models/efficientnet_lite0.onnx
.venv/bin/python tools/example_images.py --out examples
.venv/bin/onnxcam explain models/efficientnet_lite0.onnx examples/ --out demo_out --overwrite "$@"
