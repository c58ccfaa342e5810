#!/usr/bin/env bash
# Set up both test environments from scratch (if missing) and run the suite in each:
#   .venv           onnxcam[cpu,test]        onnxruntime, portable gradients, torch oracles
#   .venv-training  onnxcam[training-cpu]    onnxruntime-training 1.19.2: both backends cross-checked
#                   (both at the versions of tools/constraints-tested.txt; ONNXCAM_TEST_LATEST=1: at the
#                   newest releases instead, in .venv-latest and .venv-training-latest)
#   .venv-min       onnxcam[cpu] at the minimum versions of tools/constraints-min.txt (onnx,
#                   onnxruntime, numpy, opencv, click); no torch, so the torch-oracle tests skip there
# The ONNX Runtime builds cannot share one environment. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
if [ "${ONNXCAM_TEST_LATEST:-0}" = 1 ]; then
  MAIN=.venv-latest; TRAINING=.venv-training-latest; PINS=()
else
  MAIN=.venv; TRAINING=.venv-training; PINS=(-c tools/constraints-tested.txt)
fi
make_venv "$MAIN" "${PINS[@]}" -e ".[cpu,test]"
make_venv "$TRAINING" "${PINS[@]}" -e ".[training-cpu]" pytest
make_venv .venv-min -c tools/constraints-min.txt -e ".[cpu]" pytest
# headless Chromium renders the `onnxcam compare` HTML report in one test (skipped, saying so, without it)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "could not install chromium: the HTML report rendering test will be skipped"
fi
echo "== suite on onnxruntime (portable backend): $MAIN"
"$MAIN"/bin/python -m pytest -q -p no:cacheprovider tests "$@"
echo "== suite on onnxruntime-training-cpu (both backends): $TRAINING"
"$TRAINING"/bin/python -m pytest -q -p no:cacheprovider tests "$@"
echo "== suite at the minimum supported versions (tools/constraints-min.txt)"
.venv-min/bin/python -m pytest -q -p no:cacheprovider tests "$@"
