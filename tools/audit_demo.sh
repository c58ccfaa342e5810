#!/usr/bin/env bash
# The audit job from scratch: build the pretrained EfficientNet-Lite0 twice (legacy and dynamo torch
# exporters), an int8 QDQ build of it and a copy with a damaged last block, then compare all three
# candidates with the legacy export on the example photos. The damaged copy fails the gate, so
# `onnxcam compare` exits 1; the report is demo_out/compare.html (screenshot in docs/ when Chromium is
# installed). Extra arguments go to `onnxcam compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
make_venv .venv -c tools/constraints-tested.txt -e ".[cpu,tools]"
PY=.venv/bin/python
$PY tools/make_efficientnet.py --out models/efficientnet_lite0.onnx
$PY tools/make_efficientnet.py --dynamo --out models/efficientnet_lite0_dynamo.onnx
$PY tools/make_audit_models.py --model models/efficientnet_lite0.onnx --out models
$PY tools/example_images.py --out examples
status=0
.venv/bin/onnxcam compare models/efficientnet_lite0.onnx models/efficientnet_lite0_dynamo.onnx \
  models/efficientnet_lite0_int8_qdq.onnx models/efficientnet_lite0_damaged.onnx examples/ \
  --fail-under pearson_min=0.99,top1_agreement=1 --html demo_out/compare.html "$@" || status=$?
echo "onnxcam compare exit code: $status"
if command -v chromium >/dev/null 2>&1; then
  mkdir -p docs
  chromium --headless --disable-gpu --no-sandbox --hide-scrollbars --window-size=1400,1700 \
    --screenshot=docs/compare_report.png "file://$PWD/demo_out/compare.html" 2>/dev/null
fi
