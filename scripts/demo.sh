#!/usr/bin/env bash
# The main job on the tiny embedded default, start to end, on a CPU:
#   tiny Qwen2.5-VL -> synthetic data -> HF->Megatron (+ logits check) -> cold-start SFT ->
#   PTST GRPO with vLLM rollouts and resync -> held-out accuracy (cold start vs PTST) ->
#   Megatron->HF export -> TensorBoard logs and the PNG report.
# Every step writes into $RUN (default runs/tiny); a rerun starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/tiny}
MV=".venv/bin/megatron-vr1"
PY=".venv/bin/python"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$RUN"
mkdir -p "$RUN"
t0=$(date +%s)
say() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

say "1/8 tiny Qwen2.5-VL (HF format) -> $RUN/hf"
$MV tiny-model --out "$RUN/hf" --seed 0
say "2/8 synthetic task (count the red shapes) -> $RUN/data"
$PY -m megatron_vr1.data.synthetic --out "$RUN/data" --n-train 2000 --n-val 100 --n-test 200 --n-sft 2000
say "3/8 HF -> Megatron, and Megatron-vs-transformers logits"
$MV convert hf-to-mcore --hf "$RUN/hf" --out "$RUN/mcore" --no-progress
$MV convert verify --hf "$RUN/hf" --mcore "$RUN/mcore" 2> "$RUN/verify.log"
say "4/8 cold-start SFT"
$MV sft configs/tiny_cpu_sft.yaml run_dir="$RUN/sft" model.hf_path="$RUN/hf" model.mcore_path="$RUN/mcore" \
  sft.data_path="$RUN/data/coldstart_sft.jsonl" sft.image_root="$RUN/data" 2> "$RUN/sft.log"
say "5/8 PTST GRPO (vLLM rollouts, resync every step)"
$MV train configs/tiny_cpu.yaml run_dir="$RUN/rl" model.hf_path="$RUN/hf" \
  model.mcore_path="$RUN/sft/checkpoints/sft_final" data.train_path="$RUN/data/rl_train.parquet" \
  data.val_path="$RUN/data/rl_val.parquet" 2> "$RUN/rl.log"
say "6/8 Megatron -> HF (cold start, and the PTST policy chosen on the validation split)"
$MV convert mcore-to-hf --mcore "$RUN/sft/checkpoints/sft_final" --out "$RUN/hf_coldstart" --no-progress
$MV convert mcore-to-hf --mcore "$RUN/rl/checkpoints/best" --out "$RUN/hf_final" --no-progress
say "7/8 held-out accuracy (greedy, HFRRF), cold start vs PTST"
$PY -m megatron_vr1.quick_eval --hf "$RUN/hf_coldstart" --data "$RUN/data/rl_test.parquet" --json "$RUN/eval_coldstart.json" 2>/dev/null
$PY -m megatron_vr1.quick_eval --hf "$RUN/hf_final" --data "$RUN/data/rl_test.parquet" --json "$RUN/eval_final.json" 2>/dev/null
say "8/8 report"
$MV report "$RUN/rl"
$PY - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
a = json.load(open(f"{run}/eval_coldstart.json")); b = json.load(open(f"{run}/eval_final.json"))
gain = 100 * (b["accuracy"] - a["accuracy"])
print(f"held-out accuracy: cold start {100 * a['accuracy']:.1f}% -> PTST {100 * b['accuracy']:.1f}% ({gain:+.1f} points); "
      f"mean length {a['len_mean']:.1f} -> {b['len_mean']:.1f} tokens")
PY
say "demo: done. TensorBoard: .venv/bin/tensorboard --logdir $RUN/rl/tensorboard   report: $RUN/rl/report.png"
