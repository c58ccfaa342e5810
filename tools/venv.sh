# Sourced by tools/*.sh: make_venv VENV PIP-ARGS... creates VENV if missing and installs into it.
PY=${PYTHON:-python3}
make_venv() {
  local venv=$1; shift
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v WARNING || true
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v WARNING || true
  "$venv/bin/python" -c "import onnxcam, onnxruntime" || { echo "set-up of $venv failed" >&2; exit 1; }
}
