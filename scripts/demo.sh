#!/usr/bin/env bash
# The main job on the tiny embedded default. Today it covers what has landed: build the tiny
# Qwen2.5-VL, convert it to Megatron, check Megatron-vs-transformers logits, export it back to HF
# and check the round trip bit for bit. (Cold-start SFT, PTST GRPO with vLLM and eval join this
# script as they land: issues 3, 4 and 7.)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/tiny}
MV=".venv/bin/megatron-vr1"
mkdir -p "$RUN"
echo "== 1/4 tiny Qwen2.5-VL (HF format) -> $RUN/hf"
$MV tiny-model --out "$RUN/hf" --seed 0 --overwrite
echo "== 2/4 HF -> Megatron distributed checkpoint -> $RUN/mcore"
$MV convert hf-to-mcore --hf "$RUN/hf" --out "$RUN/mcore" --tp 1 --pp 1 --overwrite --no-progress
echo "== 3/4 Megatron vs transformers logits"
$MV convert verify --hf "$RUN/hf" --mcore "$RUN/mcore" 2> "$RUN/verify.log"
echo "== 4/4 Megatron -> HF -> $RUN/hf_export, and the round trip"
$MV convert mcore-to-hf --mcore "$RUN/mcore" --out "$RUN/hf_export" --overwrite --no-progress
.venv/bin/python - "$RUN/hf" "$RUN/hf_export" <<'PY'
import sys, torch
from checkpoints_conv.hf_io import HFReader
a, b = HFReader(sys.argv[1]), HFReader(sys.argv[2])
same = sorted(a.raw_names.values()) == sorted(b.raw_names.values()) and all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names())
print(f"round trip: {len(a.names())} tensors, {'bit-identical' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
PY
echo "demo: ok ($RUN)"
