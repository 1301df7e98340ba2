#!/usr/bin/env bash
# One command to a working environment: creates .venv (if absent) with torch,
# torchvision, higher, h5py, the package itself (editable) and the dev/peer tools,
# including learn2learn 0.2.0 built for Python 3.11. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet -e ".[dev]"
scripts/install_learn2learn.sh "$PY"
