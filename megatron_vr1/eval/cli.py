"""`megatron-vr1 eval`: score a checkpoint on MathVista, MathVerse, MM-Math, MathVision, DynaMath.

    megatron-vr1 eval --model HF_OR_MCORE_DIR --bench mathvista,mathverse,mmmath --data DIR [--out DIR]
                      [--limit N] [--max-new-tokens 16000] [--max-model-len 32768] [--retries 5]
                      [--judge-url http://127.0.0.1:8000/v1 --judge-model NAME]
    megatron-vr1 eval --responses OUT_DIR --bench ... --data DIR --out NEW_DIR   # re-score a run

Writes OUT/<bench>.jsonl (one record per sample), OUT/summary.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from megatron_vr1.config import SYSTEM_PROMPTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="an HF folder, or a megatron-vr1 checkpoint (exported to HF first)")
    p.add_argument("--bench", required=True, help="comma-separated: mathvista,mathverse,mmmath,mathvision,dynamath")
    p.add_argument("--data", required=True, type=Path, help="folder with one sub-folder per benchmark (local files)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="results folder (default runs/eval)")
    p.add_argument("--file", action="append", default=[], metavar="BENCH=PATH", help="a benchmark's data file")
    p.add_argument("--limit", type=int, help="first N samples per benchmark (DynaMath: N seed questions)")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave malformed rows out (counted) instead of failing")
    g = p.add_argument_group("generation (Vision-R1's evaluation settings by default)")
    g.add_argument("--max-new-tokens", type=int, default=16000)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--retries", type=int, default=5, help="sample again a response without </answer>, up to N times")
    g.add_argument("--max-model-len", type=int, default=32768, help="prompt + response tokens (capped by the model)")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--dtype", help="vLLM dtype (default: float32 on CPU, the checkpoint's on GPU)")
    g.add_argument("--batch-size", type=int, default=256, help="prompts per generate call")
    g.add_argument("--system-prompt", default="none",
                   help="none (Vision-R1), r1-zero (Vision-R1-Zero's prompt) or the text of a system prompt")
    g.add_argument("--paper-size", help="compare with the paper's numbers of this size (3B/7B/32B/72B)")
    g.add_argument("--responses", type=Path, help="re-score the responses recorded in an earlier --out folder")
    j = p.add_argument_group("LLM judge (optional, any OpenAI-compatible endpoint)")
    j.add_argument("--judge-url", help="e.g. http://127.0.0.1:8000/v1")
    j.add_argument("--judge-model", help="model name the endpoint serves")
    j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    j.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    j.add_argument("--judge-retries", type=int, default=3)
    j.add_argument("--judge-workers", type=int, default=4, help="requests in flight")


def settings_from_args(a: argparse.Namespace):
    from megatron_vr1.eval.loaders import parse_bench_list
    from megatron_vr1.eval.runner import EvalSettings, JudgeSettings

    benches = parse_bench_list(a.bench)
    files = {}
    for item in a.file:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--file {item!r}: use BENCH=PATH, e.g. --file mathvista=data/MathVista/testmini.json")
        files[parse_bench_list(name)[0]] = Path(path)
    system = None if a.system_prompt == "none" else SYSTEM_PROMPTS.get(a.system_prompt, a.system_prompt)
    judge = None
    if a.judge_url or a.judge_model:
        if not (a.judge_url and a.judge_model):
            raise ValueError("the judge needs both --judge-url and --judge-model")
        judge = JudgeSettings(a.judge_url, a.judge_model, a.judge_api_key_env, a.judge_timeout, a.judge_retries,
                              a.judge_workers)
    return EvalSettings(
        benches=benches, data=a.data, out=a.out, model=a.model, files=files, limit=a.limit,
        skip_bad_rows=a.skip_bad_rows, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
        seed=a.seed, retries=a.retries, max_model_len=a.max_model_len, kv_cache_gib=a.kv_cache_gib,
        gpu_memory_utilization=a.gpu_memory_utilization, dtype=a.dtype, batch_size=a.batch_size,
        system_prompt=system, paper_size=a.paper_size, judge=judge, responses=a.responses,
    )


def run(a: argparse.Namespace) -> int:
    from megatron_vr1.eval.runner import run_eval

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run_eval(settings_from_args(a))
    for s in result["summaries"]:
        judge = f", judge {s['judge']['accuracy']:.1f} ({s['judge']['failed']} failed)" if "judge" in s else ""
        print(f"{s['bench']}: n={s['n']} accuracy {s['accuracy']:.1f} (no retry {s['accuracy_no_retry']:.1f}){judge}, "
              f"mean length {s['length']['mean']:.1f} tokens")
    print(f"results: {result['paths']['markdown']} ({result['seconds']:.1f} s)")
    return 0
