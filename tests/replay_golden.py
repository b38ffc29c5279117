"""GRPO steps on fixed responses, for the golden-number test (tests/test_rl_loop.py).

A sampled RL run cannot be a golden file that holds across processors: one sampled token that
flips under another instruction set changes every later number. Here the responses are written,
not sampled, so the numbers depend only on the arithmetic of the loop's own pieces: the reward
(`score`), the group advantages, the trainer's old and reference logprobs (`prepare_batches`),
the clipped-surrogate + KL update with the global-mean scaling (`policy_updates`) and the resync
into the real vLLM engine, whose teacher-forced logprobs stand in for the behaviour policy.

Each step takes the sampler's next prompts and gives each prompt G=4 responses: the right answer
in the Vision-R1 format, a wrong answer in the format, the right answer without the format, and a
response cut at the length cap (finish reason "length"). The first prompt of each step gets two
right answers instead of the wrong one, so the groups' advantages differ.

    python tests/replay_golden.py --hf H --mcore M --data D --run-dir R --out metrics.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LEN = 40
GROUP = 4


def responses(answer: str, first: bool) -> list[tuple[str, str]]:
    """(text, finish reason) of the G fixed responses of one prompt."""
    right = f"<think>I count the red shapes: {answer}.</think><answer>{answer}</answer>"
    wrong_n = str((int(answer) + 1) % 5)
    wrong = f"<think>I count the red shapes: {wrong_n}.</think><answer>{wrong_n}</answer>"
    second = right if first else wrong
    plain = f"The answer is {answer}."
    long = "<think>" + " ".join(["I look again at every shape in the picture"] * 8)
    return [(right, "stop"), (second, "stop"), (plain, "stop"), (long, "length")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--mcore", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from megatron_vr1.cli import quiet_libraries

    quiet_libraries()
    import torch

    from megatron_vr1.config import load_config, load_hf_arch
    from megatron_vr1.data.rl_dataset import build_prompt
    from megatron_vr1.rl import loop
    from megatron_vr1.rollout.engine import Rollout, SamplingSettings

    data = Path(args.data)
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", [
        f"run_dir={args.run_dir}", f"model.hf_path={args.hf}", f"model.mcore_path={args.mcore}",
        f"data.train_path={data / 'rl_train.parquet'}", "data.val_path=null",
        "rollout.prompts_per_step=4", "grpo.minibatch_prompts=2", "parallel.micro_batch_size=4",
        "optim.lr=2e-4", "optim.warmup_ratio=0", "grpo.kl_beta=0.01", "logging.val_interval=0",
        f"ptst.stages=[{{max_response_length: {MAX_LEN}, group_size: {GROUP}, steps: {args.steps}}}]",
        *args.overrides])
    arch = load_hf_arch(cfg.model.hf_path)
    run = loop.setup(cfg, arch)
    stage = [s for s in cfg.ptst.stages if s.enabled][0]
    tok = run.processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for step in range(1, args.steps + 1):
        loop.set_lr(run, loop.rl_lr(cfg, [stage], stage, step))
        rows = run.sampler.next_batch()
        prompts = [build_prompt(r, run.processor, cfg.data.system_prompt) for r in rows]
        # the prompt ids with the image pads expanded, as the engine sees them
        heads = run.engine.generate(prompts, SamplingSettings(n=1, max_tokens=1, temperature=0.0))
        groups, conts = [], []
        for i, (row, head) in enumerate(zip(rows, heads)):
            group = []
            for j, (text, finish) in enumerate(responses(row.answer, first=i == 0)):
                ids = tok.encode(text, add_special_tokens=False)
                ids = ids[:MAX_LEN] if finish == "length" else ids + [eos]
                group.append(Rollout(prompt_index=i, sample_index=j, prompt_ids=list(head[0].prompt_ids),
                                     response_ids=ids, response_logprobs=[], finish_reason=finish,
                                     response_text=tok.decode(ids, skip_special_tokens=True),
                                     images=list(prompts[i].images), seconds=0.0))
                conts.append((i, ids))
            groups.append(group)
        lps = run.engine.prompt_logprobs([prompts[i] for i, _ in conts], [ids for _, ids in conts])
        for r, lp in zip((r for g in groups for r in g), lps):
            r.response_logprobs = list(lp)
        scored = loop.score(run, rows, groups, stage)
        batches, seq_len = loop.prepare_batches(run, scored)
        updates = loop.policy_updates(run, batches, seq_len)
        loop.resync(run)
        mask = torch.cat([mb.loss_mask_BT.flatten() for mb in batches])
        out.append({
            "step": step,
            "rewards": [s.reward for s in scored],
            "advantages": [s.advantage for s in scored],
            "tokens": int(mask.sum()),
            "optimizer_steps": len(updates),
            **{f"train/{k}": [getattr(u, k) for u in updates]
               for k in ("loss", "pg_loss", "kl", "clip_frac", "ratio_mean", "grad_norm", "entropy")},
            "mismatch/max_abs": max(u.mismatch_max for u in updates),
        })
    loop.finish(run)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
