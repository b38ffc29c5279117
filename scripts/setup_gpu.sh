#!/usr/bin/env bash
# The GPU environment from requirements-gpu.txt (Python 3.12, Linux x86_64, CUDA 13 driver).
# Idempotent: a second run only checks a stamp and exits.
#   bash scripts/setup_gpu.sh                          # a venv at .venv-gpu (VENV=... to choose)
#   SETUP_GPU_IN_PLACE=1 bash scripts/setup_gpu.sh     # into the current Python (e.g. an NGC PyTorch
#                                                      # container, whose torch/TE are then replaced
#                                                      # only where the pins differ)
#   SETUP_GPU_SKIP_TE_TORCH=1 ...                      # do not build Transformer Engine's PyTorch extension
# Slurm jobs use it with `export MEGATRON_VR1_VENV=$PWD/.venv-gpu` before sbatch (see slurm/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.12}
if [[ ${SETUP_GPU_IN_PLACE:-} == 1 ]]; then
  TARGET_PY=$(command -v "${PYTHON:-python}")
  STAMP=$("$TARGET_PY" -c 'import sys; print(sys.prefix)')/.megatron-vr1-setup-gpu
else
  VENV=${VENV:-$ROOT/.venv-gpu}
  TARGET_PY=$VENV/bin/python
  STAMP=$VENV/.megatron-vr1-setup-gpu
fi
# The stamp is the hash of the pins: editing requirements-gpu.txt makes set-up run again.
WANT=$(sha256sum requirements-gpu.txt | cut -c1-16)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "setup_gpu: up to date ($TARGET_PY, requirements-gpu.txt $WANT)"
  exit 0
fi
if [[ ${SETUP_GPU_IN_PLACE:-} != 1 && ! -x $TARGET_PY ]]; then
  command -v "$PY" >/dev/null || { echo "setup_gpu: $PY not found; set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "setup_gpu: creating the venv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
"$TARGET_PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "setup_gpu: $TARGET_PY is not Python 3.12 (the pins are for 3.12)" >&2; exit 1; }
echo "setup_gpu: installing requirements-gpu.txt into $TARGET_PY"
"$TARGET_PY" -m pip install --disable-pip-version-check -r requirements-gpu.txt
TE_TORCH=$(grep -oE 'transformer-engine-torch==[^ ]+' requirements-gpu.txt)
if [[ ${SETUP_GPU_SKIP_TE_TORCH:-} == 1 ]]; then
  echo "setup_gpu: skipping $TE_TORCH (SETUP_GPU_SKIP_TE_TORCH=1)"
elif "$TARGET_PY" -c 'import transformer_engine.pytorch' 2>/dev/null; then
  echo "setup_gpu: transformer_engine.pytorch imports already"
else
  echo "setup_gpu: building $TE_TORCH against the installed torch (needs nvcc / the CUDA toolkit; minutes)"
  "$TARGET_PY" -m pip install --disable-pip-version-check --no-build-isolation "$TE_TORCH"
fi
echo "setup_gpu: installing megatron-vr1 (editable, no dependencies)"
"$TARGET_PY" -m pip install --disable-pip-version-check --no-deps -e .
"$TARGET_PY" - <<'PY'
import importlib.metadata as md
for d in ("torch", "torchvision", "megatron-core", "transformer-engine", "vllm", "transformers"):
    try:
        print(f"setup_gpu: {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"setup_gpu: {d} not installed")
PY
echo "$WANT" > "$STAMP"
echo "setup_gpu: ok ($TARGET_PY); check the machine with: $TARGET_PY bench/gpu_check.py --out gpu_check"
