#!/usr/bin/env bash
# How reliable is the tiny demo's gain, and is RL better than simply training the cold start longer?
# Reuses a finished `make demo` folder ($RUN, default runs/tiny: its data and cold-start checkpoint) and
#   1. reruns the PTST GRPO stage with other seeds (sampling, prompt order, vLLM),
#   2. continues the cold-start SFT for $SFT_STEPS more steps from sft_final (an equal-compute
#      baseline: one GRPO step of 16 prompts x 8 samples costs about 128 x (generation + 2 forward +
#      forward/backward) ~ 6-7 SFT steps of 32 examples, so 60 GRPO steps ~ 400 SFT steps),
# then scores each policy with the same greedy held-out evaluation as the demo.
#   bash bench/demo_seeds.sh            # SEEDS="1 2" SFT_STEPS=400 RUN=runs/tiny
#   TAG=lr1e-4 EXTRA="optim.lr=1e-4" SFT_STEPS=0 bash bench/demo_seeds.sh   # a recipe variant, no baseline
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/tiny}
SEEDS=${SEEDS:-"1 2"}
SFT_STEPS=${SFT_STEPS:-400}
TAG=${TAG:-}
EXTRA=${EXTRA:-}
MV=".venv/bin/megatron-vr1"
PY=".venv/bin/python"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
test -d "$RUN/sft/checkpoints/sft_final" || { echo "error: $RUN has no finished demo; run make demo first" >&2; exit 2; }
mkdir -p "$RUN/seeds"
for seed in $SEEDS; do
  out="$RUN/seeds/rl${TAG:+_$TAG}_seed$seed"
  rm -rf "$out" "$out.hf"
  echo "== GRPO seed $seed -> $out"
  $MV train configs/tiny_cpu.yaml run_dir="$out" seed="$seed" model.hf_path="$RUN/hf" \
    model.mcore_path="$RUN/sft/checkpoints/sft_final" data.train_path="$RUN/data/rl_train.parquet" \
    data.val_path="$RUN/data/rl_val.parquet" $EXTRA > "$out.log" 2>&1
  $MV convert mcore-to-hf --mcore "$out/checkpoints/best" --out "$out.hf" --no-progress
  $PY -m megatron_vr1.quick_eval --hf "$out.hf" --data "$RUN/data/rl_test.parquet" --json "$out.eval.json" 2>/dev/null
done
out="$RUN/seeds/sft_more"
if [ "$SFT_STEPS" -gt 0 ]; then
rm -rf "$out" "$out.hf"
epochs=$(( (SFT_STEPS + 62) / 63 ))   # 2000 rows / 32 = 63 steps an epoch
echo "== cold start + $SFT_STEPS SFT steps -> $out"
$MV sft configs/tiny_cpu_sft.yaml run_dir="$out" model.hf_path="$RUN/hf" \
  model.mcore_path="$RUN/sft/checkpoints/sft_final" sft.data_path="$RUN/data/coldstart_sft.jsonl" \
  sft.image_root="$RUN/data" sft.epochs="$epochs" optim.warmup_ratio=0.05 checkpoint.save_interval=100000 \
  --stop-after-step "$SFT_STEPS" > "$out.log" 2>&1
ckpt="$out/checkpoints/$(cat "$out/checkpoints/latest")"
$MV convert mcore-to-hf --mcore "$ckpt" --out "$out.hf" --no-progress
$PY -m megatron_vr1.quick_eval --hf "$out.hf" --data "$RUN/data/rl_test.parquet" --json "$out.eval.json" 2>/dev/null
fi
$PY - "$RUN" "$TAG" $SEEDS <<'PY'
import json, os, sys
run, tag, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
def acc(p):
    r = json.load(open(p)); return f"{100 * r['accuracy']:.1f} % ({r['len_mean']:.1f} tokens)"
print("| policy | held-out greedy accuracy (mean length) |\n|---|---|")
print(f"| cold start | {acc(f'{run}/eval_coldstart.json')} |")
print(f"| PTST, seed 1234 (the demo) | {acc(f'{run}/eval_final.json')} |")
prefix, label = (f"rl_{tag}", f"PTST {tag}") if tag else ("rl", "PTST")
for s in seeds:
    print(f"| {label}, seed {s} | {acc(f'{run}/seeds/{prefix}_seed{s}.eval.json')} |")
if os.path.exists(f"{run}/seeds/sft_more.eval.json"):
    print(f"| cold start + more SFT (equal compute) | {acc(f'{run}/seeds/sft_more.eval.json')} |")
PY
