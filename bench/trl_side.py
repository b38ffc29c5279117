"""The TRL side of bench/grpo_vs_trl.py: TRL's GRPOTrainer (HF generate) on the work our trainer does.

Run by the throw-away TRL venv's Python (runs/bench_trl/trl_venv, which overlays the project venv),
never by hand in the project venv (TRL is not installed there):

    runs/bench_trl/trl_venv/bin/python bench/trl_side.py --spec runs/bench_trl/trl_spec.json --out OUT.json

The spec (written by grpo_vs_trl.py) holds the HF cold-start folder, the RL parquet, the row
indices in our trainer's prompt order (`PromptSampler`, step after step), our first batch's
prompt token ids, and the settings: prompts per step, group size, max new tokens, lr, micro-batch,
threads, seed, image pixel bounds. What this script keeps equal to `megatron-vr1 train`:

* the prompts: our rows (`load_rl_rows`), our chat messages (`placeholder_content`, no system
  message, as `build_prompt` with `data.system_prompt: null`), in our order (TRL's sampler is not
  shuffled; the dataset is laid out in our order); the first batch's prompt token ids (image pad
  tokens included) are asserted equal to ours before anything is generated;
* the processor (`load_processor` with our min/max pixels), the reward (our `score_batch`, HFRRF),
  sampling (temperature 1, top_p 1, no top-k), max new tokens, group size;
* the update: beta 0 (no reference model), one pass (num_iterations 1), one optimizer step per
  generation batch (gradient_accumulation_steps x per_device_train_batch_size = prompts x group),
  clip 0.2, token-mean over the batch (loss_type "dapo"), group-std advantages, AdamW with our
  betas / eps / weight decay, grad-norm clip 1.0, constant lr, no warmup, fp32, no gradient
  checkpointing (our recipe recomputes nothing either).

Timings: a callback takes the wall time at the end of every optimizer step; the generation
(`_generate`: HF generate and decoding) and reward (`_calculate_rewards`) phases are timed by a
subclass that wraps those two methods, which also counts the generated tokens (up to and including
EOS, what TRL trains on). Everything is written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="JSON written by bench/grpo_vs_trl.py")
    ap.add_argument("--out", required=True, help="where the timings go (JSON)")
    a = ap.parse_args()
    spec = json.load(open(a.spec))
    t0 = float(spec.get("t0") or T_START)  # the driver's wall clock when it started this process

    import torch

    torch.set_num_threads(int(spec["threads"]))

    import accelerate
    import transformers
    import trl
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_vr1.data.rl_dataset import load_rl_rows, placeholder_content
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.rewards import score_batch

    P, G, N = int(spec["prompts"]), int(spec["group_size"]), int(spec["steps"])
    rows = load_rl_rows(spec["data"])
    order = spec["order"]
    if len(order) != P * N:
        raise SystemExit(f"the spec has {len(order)} rows in order, expected prompts x steps = {P * N}")
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": placeholder_content(rows[i].problem)}] for i in order],
        "images": [list(rows[i].images) for i in order],
        "answer": [rows[i].answer for i in order],
    })

    processor = load_processor(spec["hf"], min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(spec["hf"], dtype=torch.float32)

    def hfrrf(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        texts = [t if isinstance(t, str) else "".join(p.get("text") or "" for p in t) for t in texts]
        return [r.reward for r in score_batch(texts, list(answer), reward="hfrrf")]

    mb = int(spec["micro_batch"])
    if (P * G) % mb:
        raise SystemExit(f"prompts x group ({P * G}) is not a multiple of the micro-batch ({mb})")
    cfg = GRPOConfig(
        output_dir=spec["run_dir"], report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
        seed=int(spec["seed"]), max_steps=N, shuffle_dataset=False,
        per_device_train_batch_size=mb, gradient_accumulation_steps=P * G // mb,  # one step per generation
        num_generations=G, max_completion_length=int(spec["max_tokens"]),
        temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=float(spec["lr"]), lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=float(spec["weight_decay"]), adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        adam_epsilon=float(spec["adam_eps"]), max_grad_norm=float(spec["grad_clip"]),
        log_completions=False,
    )
    expected = spec["first_batch_prompt_ids"]
    rec = {"generate_s": [], "reward_s": [], "tokens": [], "prompt_ids_equal": None}

    class TimedGRPO(GRPOTrainer):
        def _tokenize_prompts(self, prompts):
            out = super()._tokenize_prompts(prompts)
            if rec["prompt_ids_equal"] is None:
                ids = [list(map(int, x)) for x in out[0]]
                if len(ids) != P * G:
                    raise AssertionError(f"TRL tokenized {len(ids)} prompts, expected {P * G}")
                for k in range(P):
                    for j in range(G):
                        if ids[k * G + j] != expected[k]:
                            raise AssertionError(
                                f"prompt {k} (sample {j}): TRL's token ids differ from ours\n"
                                f" TRL : {ids[k * G + j]}\n ours: {expected[k]}")
                rec["prompt_ids_equal"] = True
                print(f"trl_side: first batch prompt token ids equal ours ({P} prompts x {G})", flush=True)
            return out

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            rec["generate_s"].append(time.perf_counter() - t)
            rec["tokens"].append(int(sum(len(c) for c in out[1])))
            return out

        def _calculate_rewards(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            rec["reward_s"].append(time.perf_counter() - t)
            return out

    ends: list[float] = []
    log_rows: list[dict] = []
    begin: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            begin.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.time())
            if len(ends) == 1:
                print(f"trl_side: step 1 done {ends[0] - t0:.1f} s after start", flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                log_rows.append({"step": state.global_step,
                                 **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})

    trainer = TimedGRPO(model=model, reward_funcs=[hfrrf], args=cfg, train_dataset=ds, processing_class=processor,
                        callbacks=[Clock()])
    trainer.train()
    if rec["prompt_ids_equal"] is not True:
        raise AssertionError("the prompt token ids were never checked")
    step_s = [ends[0] - begin[0]] + [b - a for a, b in zip(ends, ends[1:])]
    result = {
        "side": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "startup_to_step1_end_s": ends[0] - t0,
        "steps": [{"step": i + 1, "step_s": s,
                   "generate_s": rec["generate_s"][i] if i < len(rec["generate_s"]) else None,
                   "reward_s": rec["reward_s"][i] if i < len(rec["reward_s"]) else None,
                   "tokens": rec["tokens"][i] if i < len(rec["tokens"]) else None}
                  for i, s in enumerate(step_s)],
        "prompt_ids_equal": True,
        "logs": log_rows,
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"trl_side: {len(step_s)} steps, wrote {a.out}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
