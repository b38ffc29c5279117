"""Greedy accuracy of an HF checkpoint folder on Vision-R1-rl rows (the demo's held-out test).

`python -m megatron_vr1.quick_eval --hf DIR --data test.parquet [--max-tokens N] [--json OUT]`
The benchmark evaluation (`megatron-vr1 eval`) uses the same engine, prompt rendering and rewards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def greedy_accuracy(hf_dir: str | Path, data: str | Path, max_tokens: int = 64, system_prompt: str | None = None) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.data.rl_dataset import build_prompt, load_rl_rows
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.rollout.engine import SamplingSettings
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    rows = load_rl_rows(data)
    arch = load_hf_arch(hf_dir)
    proc = load_processor(hf_dir)
    engine = VLLMEngine(hf_dir, arch, max_model_len=512 + max_tokens, kv_cache_bytes=64 * 2**20)
    try:
        groups = engine.generate([build_prompt(r, proc, system_prompt) for r in rows],
                                 SamplingSettings(n=1, max_tokens=max_tokens, temperature=0.0))
    finally:
        engine.shutdown()
    return greedy_scores(groups, rows)


def greedy_scores(groups, rows) -> dict:
    """Accuracy (HFRRF reward 1), format rate and mean length of one greedy response per row: the
    numbers of this script and of the RL loop's validation alike."""
    from megatron_vr1.rewards import score_batch

    res = score_batch([g[0].response_text for g in groups], [r.answer for r in rows], reward="hfrrf")
    n = len(rows)
    return {"n": n, "accuracy": sum(x.reward for x in res) / n, "format_rate": sum(x.format_ok for x in res) / n,
            "len_mean": sum(len(g[0].response_ids) for g in groups) / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_vr1.quick_eval")
    ap.add_argument("--hf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    r = greedy_accuracy(a.hf, a.data, a.max_tokens)
    print(json.dumps(r))
    if a.json:
        from megatron_vr1.coldstart.store import atomic_write_text  # never a half-written result

        atomic_write_text(Path(a.json), json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
