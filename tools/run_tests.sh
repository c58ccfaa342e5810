#!/usr/bin/env bash
# Set up both test environments from scratch (if missing) and run the suite in each:
#   .venv           onnxcam[cpu,test]        current onnxruntime, portable gradients, torch oracles
#   .venv-training  onnxcam[training-cpu]    onnxruntime-training 1.19.2: both backends cross-checked
# The two ONNX Runtime builds cannot share one environment. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
setup() {  # setup VENV EXTRAS...
  local venv=$1; shift
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v WARNING || true
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v WARNING || true
  "$venv/bin/python" -c "import onnxcam, onnxruntime" || { echo "set-up of $venv failed" >&2; exit 1; }
}
setup .venv -e ".[cpu,test]"
setup .venv-training -e ".[training-cpu]" pytest
echo "== suite on onnxruntime (portable backend)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
echo "== suite on onnxruntime-training-cpu (both backends)"
.venv-training/bin/python -m pytest -q -p no:cacheprovider tests "$@"
