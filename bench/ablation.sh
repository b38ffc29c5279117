#!/usr/bin/env bash
# The Vision-R1 ablation in miniature (docs/ablation.md), on the tiny task with an imperfect cold start.
#   1. data: the red-shape task, its cold-start CoT written by a "weaker process" (30 % wrong
#      conclusions from a bottom-row blind spot, 40 % overthinking re-checks);
#   2. ONE shared cold start (configs/tiny_ablation_sft.yaml), scored once;
#   3. per seed, every arm from that cold start (Zero: from the base model), equal rollout budgets:
#        sft_more       cold start + SFT at equal compute (as many optimizer steps as PTST, as many
#                       sequences as PTST's rollouts; checkpoint chosen on the validation split)
#        long           Vision-R1-Long: one stage at the largest length (80 tokens, G=4), 3 x STAGE_STEPS
#        ptst           PTST: 40 tokens / G=8 then 80 tokens / G=4, STAGE_STEPS each
#        zero           Vision-R1-Zero: PTST's stages from the base model, R1-Zero prompt, format+result
#        ptst_dynamic   PTST + dynamic sampling (uses more rollouts: they are counted)
#        ptst_overlong  PTST + overlong reward shaping
#      each RL policy is `checkpoints/best` (validation split), scored on the test split (greedy);
#   4. results.jsonl -> results.md (mean ± std over seeds) and results.png (accuracy vs length).
# Knobs (environment): RUN (runs/ablation), SEEDS (3: seeds 1..3), SEED_LIST (the seeds to run, e.g. "3" to
# add one seed to an earlier run's results.jsonl; default 1..SEEDS), STAGE_STEPS (20 RL steps per PTST
# stage; every arm's budget scales with it), COLDSTART_STEPS (0: the recipe's 2 epochs = 126 steps),
# VAL_INTERVAL (5), N_TRAIN/N_VAL/N_TEST/N_SFT (2000/100/200/2000), ARMS (all of the above),
# WRONG_RATE (0.3), OVERTHINK_RATE (0.4), KEEP (1: keep an existing data + cold start in $RUN).
#   bash bench/ablation.sh                                     # the full run (see docs/ablation.md)
#   SEEDS=1 STAGE_STEPS=1 COLDSTART_STEPS=4 N_TRAIN=64 N_VAL=16 N_TEST=16 N_SFT=128 bash bench/ablation.sh  # smoke
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/ablation}
SEEDS=${SEEDS:-3}
SEED_LIST=${SEED_LIST:-$(seq 1 "$SEEDS")}
S=${STAGE_STEPS:-20}
COLDSTART_STEPS=${COLDSTART_STEPS:-0}
VAL_INTERVAL=${VAL_INTERVAL:-5}
N_TRAIN=${N_TRAIN:-2000}; N_VAL=${N_VAL:-100}; N_TEST=${N_TEST:-200}; N_SFT=${N_SFT:-2000}
ARMS=${ARMS:-"sft_more long ptst zero ptst_dynamic ptst_overlong"}
WRONG_RATE=${WRONG_RATE:-0.3}; OVERTHINK_RATE=${OVERTHINK_RATE:-0.4}
KEEP=${KEEP:-1}
P=16                     # rollout.prompts_per_step of configs/tiny_ablation_ptst.yaml
MAXTOK=80                # the largest length cap: what every policy may say at test time
MV=".venv/bin/megatron-vr1"
PY=".venv/bin/python"
REPORT="$PY bench/ablation_report.py"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$RUN"
RES="$RUN/results.jsonl"
TIMES="$RUN/timings.tsv"
t0=$(date +%s)
say() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
vi() { local n=$1; echo $(( VAL_INTERVAL < n ? VAL_INTERVAL : n )); }   # validate at least once

if [ "$KEEP" = 1 ] && [ -f "$RUN/coldstart.done" ]; then
  say "reusing $RUN/data and the cold start ($RUN/coldstart.done exists; KEEP=0 starts over)"
else
  rm -rf "$RUN/hf" "$RUN/mcore" "$RUN/data" "$RUN/coldstart" "$RUN/coldstart.hf" "$RES" "$TIMES"
  a=$(date +%s)
  say "tiny model, imperfect data, HF -> Megatron"
  $MV tiny-model --out "$RUN/hf" --seed 0 > /dev/null
  $PY -m megatron_vr1.data.synthetic --out "$RUN/data" --n-train "$N_TRAIN" --n-val "$N_VAL" --n-test "$N_TEST" \
    --n-sft "$N_SFT" --cold-start imperfect --wrong-rate "$WRONG_RATE" --overthink-rate "$OVERTHINK_RATE" > /dev/null
  $MV convert hf-to-mcore --hf "$RUN/hf" --out "$RUN/mcore" --no-progress > /dev/null
  say "the shared cold start (imperfect CoT)"
  stop=(); [ "$COLDSTART_STEPS" -gt 0 ] && stop=(--stop-after-step "$COLDSTART_STEPS")
  $MV sft configs/tiny_ablation_sft.yaml run_dir="$RUN/coldstart" model.hf_path="$RUN/hf" model.mcore_path="$RUN/mcore" \
    sft.data_path="$RUN/data/coldstart_sft.jsonl" sft.image_root="$RUN/data" "${stop[@]}" > "$RUN/coldstart.log" 2>&1
  ckpt="$RUN/coldstart/checkpoints/$(cat "$RUN/coldstart/checkpoints/latest")"
  ln -sfn "$(cd "$ckpt" && pwd)" "$RUN/coldstart/checkpoints/shared"
  $MV convert mcore-to-hf --mcore "$ckpt" --out "$RUN/coldstart.hf" --no-progress > /dev/null
  $REPORT score --hf "$RUN/coldstart.hf" --data "$RUN/data/rl_test.parquet" --arm coldstart --seed 0 --out "$RES" \
    --max-tokens $MAXTOK --extra "{\"seconds\": $(( $(date +%s) - a ))}" >> "$RUN/score.log" 2>&1
  printf 'setup_and_coldstart\t0\t%s\n' $(( $(date +%s) - a )) >> "$TIMES"
  touch "$RUN/coldstart.done"
fi
COLD="$RUN/coldstart/checkpoints/shared"

for seed in $SEED_LIST; do
  for arm in $ARMS; do
    out="$RUN/$arm/seed$seed"
    rm -rf "$out" "$out.hf" "$out.log" "$out.cand"
    mkdir -p "$RUN/$arm"
    a=$(date +%s)
    say "seed $seed: $arm -> $out"
    common=(run_dir="$out" seed="$seed" model.hf_path="$RUN/hf" data.train_path="$RUN/data/rl_train.parquet"
            data.val_path="$RUN/data/rl_val.parquet" logging.log_interval=1)
    sp=()
    case "$arm" in
      sft_more)
        # Equal compute with PTST: 2S optimizer steps (one per RL step) over as many sequences as
        # PTST's rollouts, P x (8 + 4) x S, i.e. P x 6 = 96 sequences a step.
        steps=$(( 2 * S )); gbs=$(( P * 6 ))
        epochs=$(( (steps * gbs + N_SFT - 1) / N_SFT ))
        $MV sft configs/tiny_ablation_sft_more.yaml run_dir="$out" seed="$seed" model.hf_path="$RUN/hf" \
          model.mcore_path="$COLD" sft.data_path="$RUN/data/coldstart_sft.jsonl" sft.image_root="$RUN/data" \
          sft.global_batch_size=$gbs sft.epochs=$epochs checkpoint.save_interval=$(( steps / 4 > 0 ? steps / 4 : 1 )) \
          checkpoint.keep_last=0 --stop-after-step "$steps" > "$out.log" 2>&1
        cands=()
        for c in "$out"/checkpoints/sft_step_*; do
          $MV convert mcore-to-hf --mcore "$c" --out "$out.cand/$(basename "$c")" --no-progress > /dev/null
          cands+=("$out.cand/$(basename "$c")")
        done
        best=$($REPORT pick --data "$RUN/data/rl_val.parquet" --max-tokens $MAXTOK "${cands[@]}" 2>>"$out.log" | tail -n 1)
        mv "$best" "$out.hf"; rm -rf "$out.cand"
        extra="{\"optimizer_steps\": $steps, \"sequences\": $(( steps * gbs )), \"checkpoint\": \"$(basename "$best")\""
        ;;
      long)
        $MV train configs/tiny_ablation_long.yaml "${common[@]}" model.mcore_path="$COLD" \
          "ptst.stages[0].steps=$(( 3 * S ))" logging.val_interval=$(vi $(( 3 * S ))) > "$out.log" 2>&1 ;;
      ptst|ptst_dynamic|ptst_overlong)
        $MV train "configs/tiny_ablation_$arm.yaml" "${common[@]}" model.mcore_path="$COLD" \
          "ptst.stages[0].steps=$S" "ptst.stages[1].steps=$S" logging.val_interval=$(vi $S) > "$out.log" 2>&1 ;;
      zero)
        sp=(--system-prompt r1-zero)
        $MV train configs/tiny_ablation_zero.yaml "${common[@]}" model.mcore_path="$RUN/mcore" \
          "ptst.stages[0].steps=$S" "ptst.stages[1].steps=$S" logging.val_interval=$(vi $S) > "$out.log" 2>&1 ;;
      *) echo "error: unknown arm $arm (known: sft_more long ptst zero ptst_dynamic ptst_overlong)" >&2; exit 2 ;;
    esac
    rd=()
    if [ "$arm" != sft_more ]; then
      $MV convert mcore-to-hf --mcore "$out/checkpoints/best" --out "$out.hf" --no-progress > /dev/null
      rd=(--run-dir "$out" --prompts-per-step $P)
      extra="{"
    else
      extra="$extra, "
    fi
    extra="$extra\"seconds\": $(( $(date +%s) - a ))}"
    $REPORT score --hf "$out.hf" --data "$RUN/data/rl_test.parquet" --arm "$arm" --seed "$seed" --out "$RES" \
      --max-tokens $MAXTOK "${sp[@]}" "${rd[@]}" --extra "$extra" >> "$RUN/score.log" 2>&1
    tail -n 1 "$RES"
    printf '%s\t%s\t%s\n' "$arm" "$seed" $(( $(date +%s) - a )) >> "$TIMES"
  done
done
say "report"
$REPORT table "$RES"
say "ablation: done ($RUN/results.md, $RUN/results.png, per-arm seconds in $TIMES)"
