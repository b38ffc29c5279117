#!/usr/bin/env bash
# One set-up for everything: a Python 3.11 venv at .venv with the pinned CPU stack.
# Idempotent: a second run only checks a stamp and exits in about a second.
#   bash scripts/setup.sh            # CPU stack (what `make demo` and `make test` need)
#   SETUP_SKIP_APT=1 ...             # do not touch Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
STAMP=$VENV/.megatron-vr1-setup
# Bump when the pins below change: the stamp then no longer matches and set-up runs again.
SETUP_VERSION=1

if [[ -f $STAMP && "$(cat "$STAMP")" == "$SETUP_VERSION" ]]; then
  exit 0
fi

if ! command -v "$PY" >/dev/null; then
  echo "setup: $PY not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

[[ -d $VENV ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# torch 2.13.0+cpu: pip takes the local CPU wheel where the machine has one (find-links),
# (/opt/wheels on this machine kind).
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements-cpu.txt
"${PIP[@]}" --no-deps -e .

echo "$SETUP_VERSION" > "$STAMP"
echo "setup: ok ($VENV)"
