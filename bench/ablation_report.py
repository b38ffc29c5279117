"""The ablation's scoring and report (bench/ablation.sh, docs/ablation.md).

  python bench/ablation_report.py score --hf DIR --data rl_test.parquet --arm ptst --seed 1 \
      --out runs/ablation/results.jsonl [--system-prompt r1-zero] [--run-dir RL_RUN --prompts-per-step 16] [--extra JSON]
      greedy accuracy and mean length of one policy (megatron_vr1.quick_eval's engine), appended as
      one JSON line; --run-dir adds the rollouts and optimizer steps the RL run used (metrics.jsonl)
  python bench/ablation_report.py pick --data rl_val.parquet HF_DIR [HF_DIR ...]
      prints the folder with the best greedy validation accuracy (the first one on ties)
  python bench/ablation_report.py table runs/ablation/results.jsonl [--md OUT.md] [--png OUT.png]
      a Markdown table (mean +- sample standard deviation over seeds per arm) and a PNG of accuracy
      against mean response length per arm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ARMS = {
    "coldstart": "cold start only",
    "sft_more": "cold start + SFT (equal compute)",
    "long": "Vision-R1-Long (one stage, 80 tokens)",
    "ptst": "PTST (40/G8 -> 80/G4)",
    "zero": "Vision-R1-Zero (RL from the base model)",
    "ptst_dynamic": "PTST + dynamic sampling",
    "ptst_overlong": "PTST + overlong shaping",
}
"""Arm ids in table order, with their labels."""


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def load_results(path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per arm (known arms in ARMS order, then others by first appearance); a later row
    for the same (arm, seed) replaces an earlier one (a rerun)."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["arm"], r.get("seed"))] = r
    order = [a for a in ARMS if any(k[0] == a for k in latest)]
    order += [a for a in dict.fromkeys(k[0] for k in latest) if a not in order]
    out = []
    for arm in order:
        runs = [r for (a, _), r in latest.items() if a == arm]
        acc = mean_std([100.0 * r["accuracy"] for r in runs])
        length = mean_std([float(r["len_mean"]) for r in runs])
        entry = {"arm": arm, "label": ARMS.get(arm, arm), "n": len(runs), "acc_mean": acc[0], "acc_std": acc[1],
                 "len_mean": length[0], "len_std": length[1]}
        for key in ("rollouts", "optimizer_steps", "seconds"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            entry[key] = sum(vals) / len(vals) if vals else None
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    def num(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    lines = ["| arm | seeds | test accuracy (%) | mean length (tokens) | rollouts | optimizer steps | minutes |",
             "|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['label']} | {e['n']} | {e['acc_mean']:.1f} ± {e['acc_std']:.1f} | "
                     f"{e['len_mean']:.1f} ± {e['len_std']:.1f} | {num(e['rollouts'])} | "
                     f"{num(e['optimizer_steps'])} | {num(None if e['seconds'] is None else e['seconds'] / 60, '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in summary:
        ax.errorbar(e["len_mean"], e["acc_mean"], xerr=e["len_std"], yerr=e["acc_std"], fmt="o", capsize=3,
                    label=f"{e['label']} (n={e['n']})")
    ax.set_xlabel("mean response length on the test split (tokens)")
    ax.set_ylabel("greedy test accuracy (%)")
    ax.set_title("Tiny Vision-R1 ablation: accuracy vs length (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run_budget(run_dir, prompts_per_step: int) -> dict:
    """Rollouts (responses generated, dynamic-sampling rounds included) and optimizer steps of an RL
    run, from its metrics.jsonl (one line per step: logging.log_interval 1)."""
    rollouts, opt_steps = 0.0, 0.0
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        m = m.get("metrics", m) if isinstance(m, dict) else {}
        if "ptst/group_size" not in m:
            continue
        rollouts += (1 + m.get("rollout/resample_rounds", 0.0)) * prompts_per_step * m["ptst/group_size"]
        opt_steps += m.get("train/optimizer_steps", 0.0)
    return {"rollouts": rollouts, "optimizer_steps": opt_steps}


def _score(hf, data, system_prompt, max_tokens) -> dict:
    from megatron_vr1.config import SYSTEM_PROMPTS
    from megatron_vr1.quick_eval import greedy_accuracy

    return greedy_accuracy(hf, data, max_tokens, SYSTEM_PROMPTS.get(system_prompt, system_prompt))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/ablation_report.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--hf", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--arm", required=True)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--system-prompt", default=None)
    s.add_argument("--max-tokens", type=int, default=80)
    s.add_argument("--run-dir", default=None)
    s.add_argument("--prompts-per-step", type=int, default=16, help="with --run-dir: rollout.prompts_per_step")
    s.add_argument("--extra", default="{}", help="JSON object merged into the line (e.g. seconds, optimizer_steps)")
    p = sub.add_parser("pick")
    p.add_argument("--data", required=True)
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("hf", nargs="+")
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--md", default=None, help="default: results.md next to the results")
    t.add_argument("--png", default=None, help="default: results.png next to the results")
    a = ap.parse_args(argv)

    if a.cmd == "score":
        r = _score(a.hf, a.data, a.system_prompt, a.max_tokens)
        row = {"arm": a.arm, "seed": a.seed, **r}
        if a.run_dir:
            row.update(run_budget(a.run_dir, a.prompts_per_step))
        row.update(json.loads(a.extra))
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    elif a.cmd == "pick":
        scores = [(_score(h, a.data, None, a.max_tokens)["accuracy"], -i, h) for i, h in enumerate(a.hf)]
        for acc, _, h in scores:
            print(f"{h}: validation accuracy {acc:.3f}", file=sys.stderr)
        print(max(scores)[2])
    else:
        res = Path(a.results)
        summary = summarize(load_results(res))
        md = Path(a.md) if a.md else res.with_name("results.md")
        png = Path(a.png) if a.png else res.with_name("results.png")
        md.write_text(markdown(summary))
        plot(summary, png)
        print(md.read_text(), end="")
        print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
