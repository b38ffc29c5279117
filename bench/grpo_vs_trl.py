"""Side-by-side benchmark of one GRPO step: `megatron-vr1 train` against TRL's GRPOTrainer.

    .venv/bin/python bench/grpo_vs_trl.py [--steps 20] [--threads 2] [--workdir runs/bench_trl]
                                          [--only ours|trl] [--json FILE]

(docs/bench_trl.md: what is compared and why it is fair. Run it on an otherwise idle machine:
the two sides run one after the other, never at the same time.)

1. Builds what it needs in --workdir with the project's own commands, each piece only if it is not
   there yet: the tiny Qwen2.5-VL (`megatron-vr1 tiny-model`), the synthetic task
   (`python -m megatron_vr1.data.synthetic`, the demo's sizes), HF -> Megatron, a cold-start SFT
   (configs/tiny_cpu_sft.yaml, as in scripts/demo.sh), and its HF export (`convert mcore-to-hf`),
   which TRL starts from. Then the throw-away TRL venv (<workdir>/trl_venv): a plain venv whose
   site-packages holds a .pth that calls `site.addsitedir(<project venv site-packages>)` (so the
   project venv's start-up hooks, e.g. its torchvision CPU shim, still run there), and
   `pip install --no-deps trl==1.16.0 accelerate==1.16.0` (every other TRL dependency is already in
   the project venv). Nothing is installed into the project venv.
2. Ours: `megatron-vr1 train` on a recipe written to <workdir>/ours.yaml: one PTST stage of --steps
   steps, 16 prompts x 8 samples, max 48 new tokens, lr 1e-4 constant (no warmup), kl_beta 0,
   grpo.minibatch_prompts = rollout.prompts_per_step (one optimizer step per rollout), micro-batch
   32, fp32, no validation, no checkpoint before the stage's end. Per-step seconds and phases
   (perf/rollout_s, perf/logprobs_s, perf/update_s, perf/resync_s, perf/step_s) come from its
   metrics.jsonl; the time from the process start to step 1 in metrics.jsonl is polled (0.1 s).
3. TRL: bench/trl_side.py in the TRL venv on the same cold start (HF export), the same rows in
   the same order (our `PromptSampler`, seed 1234), the first batch's prompt token ids asserted
   equal to ours (our processor on `build_prompt`'s text and images: what our engine is given), the
   same HFRRF reward (our `score_batch`), the same sampling, lr, group size, max tokens, no KL, one
   update per generation batch, fp32, --threads torch threads.
4. Prints each side's median s/step over steps 3..N, the ratio ours/TRL, our phases, TRL's
   generate / rest split, tokens generated per step on each side, the start-up time (process start
   to the end of step 1), and the processor (model name, avx512f/avx2); writes a JSON
   (--json, default <workdir>/result.json).

Both sides get OMP_NUM_THREADS=--threads; TRL also calls torch.set_num_threads(--threads). Both
run under the same allocator: `megatron-vr1` preloads tcmalloc when it is installed
(megatron_vr1/allocator.py), and TRL's process gets the same LD_PRELOAD (--trl-allocator glibc:
TRL with the default allocator instead, as a plain `python` runs it). Ours
runs vLLM with the project's own CPU settings (its KV size from the tiny recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRL_PINS = ("trl==1.16.0", "accelerate==1.16.0")
"""TRL 1.16 works with transformers 5.19; every other dependency of theirs is in the project venv."""
SEED = 1234
PROMPTS, GROUP, MAX_TOKENS, LR, MICRO_BATCH = 16, 8, 48, 1.0e-4, 32
PHASES = ("rollout", "logprobs", "update", "resync")


def say(msg: str) -> None:
    print(f"== {msg}", flush=True)


# --------------------------------------------------------------------------------- set-up


def project_python() -> Path:
    return Path(sys.executable)


def megatron_vr1_cli() -> list[str]:
    exe = Path(sys.executable).with_name("megatron-vr1")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "megatron_vr1.cli"]


def sh(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run a build command; its output goes to `log`; a failure prints the log's tail and exits."""
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n--- {log} (tail)\n{tail}")


def build(work: Path) -> dict:
    """The tiny model, data, cold start and its HF export, each only if missing. Returns the paths."""
    mv = megatron_vr1_cli()
    p = {"hf": work / "hf", "data": work / "data", "mcore": work / "mcore", "sft": work / "sft",
         "coldstart": work / "sft" / "checkpoints" / "sft_final", "hf_coldstart": work / "hf_coldstart"}
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if not (p["hf"] / "config.json").exists():
        say("tiny Qwen2.5-VL (HF) -> " + str(p["hf"]))
        shutil.rmtree(p["hf"], ignore_errors=True)
        sh(mv + ["tiny-model", "--out", p["hf"], "--seed", "0"], logs / "tiny_model.log")
    if not (p["data"] / "rl_train.parquet").exists():
        say("synthetic task -> " + str(p["data"]))
        shutil.rmtree(p["data"], ignore_errors=True)
        sh([project_python(), "-m", "megatron_vr1.data.synthetic", "--out", p["data"], "--n-train", "2000",
            "--n-val", "100", "--n-test", "200", "--n-sft", "2000"], logs / "data.log")
    if not (p["mcore"] / "model" / "metadata.json").exists():
        say("HF -> Megatron")
        shutil.rmtree(p["mcore"], ignore_errors=True)
        sh(mv + ["convert", "hf-to-mcore", "--hf", p["hf"], "--out", p["mcore"], "--no-progress"], logs / "convert.log")
    if not (p["coldstart"] / "model" / "metadata.json").exists():
        say("cold-start SFT (configs/tiny_cpu_sft.yaml, as in scripts/demo.sh)")
        shutil.rmtree(p["sft"], ignore_errors=True)
        sh(mv + ["sft", REPO / "configs" / "tiny_cpu_sft.yaml", f"run_dir={p['sft']}", f"model.hf_path={p['hf']}",
                 f"model.mcore_path={p['mcore']}", f"sft.data_path={p['data'] / 'coldstart_sft.jsonl'}",
                 f"sft.image_root={p['data']}"], logs / "sft.log")
    if not (p["hf_coldstart"] / "config.json").exists():
        say("cold start Megatron -> HF (what TRL starts from)")
        shutil.rmtree(p["hf_coldstart"], ignore_errors=True)
        sh(mv + ["convert", "mcore-to-hf", "--mcore", p["coldstart"], "--out", p["hf_coldstart"], "--no-progress"],
           logs / "export.log")
    if time.time() - t > 1:
        say(f"built in {time.time() - t:.0f} s")
    return p


def site_packages(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def trl_venv(work: Path) -> Path:
    """The throw-away TRL venv (made once): the project venv overlaid through site.addsitedir + TRL."""
    venv = work / "trl_venv"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import trl, accelerate, transformers, megatron_vr1; print(trl.__version__)"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    say(f"TRL venv -> {venv} ({', '.join(TRL_PINS)}, --no-deps, over the project venv)")
    shutil.rmtree(venv, ignore_errors=True)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
    own = Path(site_packages(py))
    # addsitedir, not a bare path line: the project venv's own .pth files (start-up hooks) run too
    (own / "zz_megatron_vr1_overlay.pth").write_text(
        f"import site; site.addsitedir({site_packages(project_python())!r})\n")
    log = work / "logs" / "trl_pip.log"
    sh([py, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *TRL_PINS], log)
    r = subprocess.run(check, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the TRL venv does not import trl:\n{r.stderr[-3000:]}")
    return py


# --------------------------------------------------------------------------------- the work


def prompt_order(train_path: Path, steps: int) -> list[int]:
    """Row indices (into `load_rl_rows`) of every step's prompts, in our trainer's order."""
    from megatron_vr1.data.rl_dataset import PromptSampler, load_rl_rows

    rows = load_rl_rows(train_path)
    sampler = PromptSampler(list(range(len(rows))), PROMPTS, seed=SEED)
    return [i for _ in range(steps) for i in sampler.next_batch()]


def first_batch_prompt_ids(hf: Path, train_path: Path, order: list[int], min_pixels, max_pixels) -> list[list[int]]:
    """Our first step's prompt token ids (image pad tokens included): our processor on the text and
    images `build_prompt` hands the rollout engine."""
    from megatron_vr1.data.rl_dataset import build_prompt, load_rl_rows
    from megatron_vr1.hf_processor import load_processor

    rows = load_rl_rows(train_path)
    proc = load_processor(hf, min_pixels=min_pixels, max_pixels=max_pixels)
    out = []
    for i in order[:PROMPTS]:
        p = build_prompt(rows[i], proc, None)
        ids = proc(text=[p.text], images=p.images)["input_ids"][0]
        out.append([int(x) for x in ids])
    return out


def ours_recipe(p: dict, work: Path, steps: int) -> Path:
    import yaml

    run_dir = work / "ours_rl"
    recipe = {
        "run_dir": str(run_dir), "seed": SEED,
        "model": {"hf_path": str(p["hf"]), "mcore_path": str(p["coldstart"]), "params_dtype": "float32"},
        "data": {"train_path": str(p["data"] / "rl_train.parquet"), "val_path": None, "max_prompt_length": 128},
        "optim": {"lr": LR, "lr_schedule": "constant", "warmup_ratio": 0.0},
        "grpo": {"kl_beta": 0.0, "minibatch_prompts": PROMPTS, "epochs_per_rollout": 1},
        "parallel": {"micro_batch_size": MICRO_BATCH},
        "rollout": {"prompts_per_step": PROMPTS, "temperature": 1.0, "top_p": 1.0, "kv_cache_gib": 0.25},
        "ptst": {"stages": [{"max_response_length": MAX_TOKENS, "group_size": GROUP, "steps": steps}]},
        "checkpoint": {"save_interval": 1_000_000},
        "logging": {"log_interval": 1, "val_interval": 0},
    }
    path = work / "ours.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_child(cmd: list, log: Path, env: dict, timeout: float, watch=None) -> tuple[float, float | None]:
    """Run a side; returns (wall s, s from start to when `watch()` first returned True)."""
    seen: list[float] = []
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                if watch is not None and watch() and not seen:  # watch is called on every poll
                    seen.append(time.time() - t0)
                stop.wait(0.1)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = "timeout"
        finally:
            stop.set()
            th.join()
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(map(str, cmd))}\n--- {log} (tail)\n{log.read_text()[-4000:]}")
    return time.time() - t0, (seen[0] if seen else None)


def read_metrics(path: Path) -> list[dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                rows[m["step"]] = {**rows.get(m["step"], {}), **m}
    return [rows[k] for k in sorted(rows)]


def run_ours(p: dict, work: Path, steps: int, env: dict, timeout: float) -> dict:
    recipe = work / "ours.yaml"  # written by ours_recipe
    run_dir = work / "ours_rl"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed
    metrics = run_dir / "metrics.jsonl"
    say(f"ours: megatron-vr1 train {recipe} ({steps} steps)")

    seen: dict[int, float] = {}  # step -> wall s from the start when its metrics line appeared

    def watch():
        for m in read_metrics(metrics):
            if "perf/step_s" in m and m["step"] not in seen:
                seen[m["step"]] = time.time() - t_start
        return 1 in seen

    t_start = time.time()
    wall, startup = run_child(megatron_vr1_cli() + ["train", recipe], work / "logs" / "ours_train.log", env, timeout,
                              watch=watch)
    ms = [m for m in read_metrics(metrics) if "perf/step_s" in m]
    if len(ms) != steps:
        raise SystemExit(f"ours: {len(ms)} steps in {metrics}, expected {steps}")
    # cross-check of perf/step_s (the sum of the timed phases): wall time between metrics lines,
    # which also holds logging and the progress line (0.1 s polling; None where a poll missed a step)
    between = {k: seen[k] - seen[k - 1] for k in seen if k - 1 in seen}
    n = PROMPTS * GROUP
    return {
        "side": "ours", "wall_s": wall, "startup_to_step1_end_s": startup,
        "steps": [{"step": m["step"], "step_s": m["perf/step_s"],
                   **{f"{k}_s": m.get(f"perf/{k}_s") for k in PHASES},
                   "tokens": round(m["rollout/len_mean"] * n), "reward_mean": m.get("reward/mean"),
                   "wall_between_lines_s": between.get(m["step"])} for m in ms],
    }


def run_trl(py: Path, p: dict, work: Path, steps: int, threads: int, order: list[int], ids: list, env: dict,
            timeout: float, min_pixels, max_pixels, optim) -> dict:
    spec = {
        "hf": str(p["hf_coldstart"]), "data": str(p["data"] / "rl_train.parquet"), "order": order,
        "first_batch_prompt_ids": ids, "prompts": PROMPTS, "group_size": GROUP, "max_tokens": MAX_TOKENS,
        "steps": steps, "lr": LR, "micro_batch": MICRO_BATCH, "threads": threads, "seed": SEED,
        "min_pixels": min_pixels, "max_pixels": max_pixels, "run_dir": str(work / "trl_run"),
        "betas": list(optim.betas), "adam_eps": optim.eps, "weight_decay": optim.weight_decay,
        "grad_clip": optim.grad_clip, "t0": None,
    }
    shutil.rmtree(work / "trl_run", ignore_errors=True)
    out = work / "trl_result.json"
    out.unlink(missing_ok=True)
    say(f"TRL: GRPOTrainer (HF generate) from {p['hf_coldstart']} ({steps} steps)")
    spec["t0"] = time.time()
    (work / "trl_spec.json").write_text(json.dumps(spec))
    wall, _ = run_child([py, BENCH / "trl_side.py", "--spec", work / "trl_spec.json", "--out", out],
                        work / "logs" / "trl_train.log", env, timeout)
    res = json.loads(out.read_text())
    res["wall_s"] = wall
    return res


# --------------------------------------------------------------------------------- report


def processor_info() -> dict:
    """The processor's model name and the ISA flags that matter for CPU kernels, from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (platform.processor() or "unknown"):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags, "cores": os.cpu_count()}


def timed_steps(side: dict) -> tuple[list[dict], str]:
    """Steps 3..N (the first two carry warm-up); all steps when there are fewer than 3."""
    late = [s for s in side["steps"] if s["step"] >= 3]
    return (late, "steps 3..N") if late else (side["steps"], "all steps (fewer than 3: a smoke run)")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(ours: dict | None, trl: dict | None) -> dict:
    out = {}
    for name, side in (("ours", ours), ("trl", trl)):
        if side is None:
            continue
        steps, which = timed_steps(side)
        s = {"median_step_s": med([x["step_s"] for x in steps]), "over": which,
             "tokens_per_step": med([x["tokens"] for x in steps]),
             "startup_to_step1_end_s": side.get("startup_to_step1_end_s"), "wall_s": side.get("wall_s")}
        if name == "ours":
            s["phases_s"] = {k: med([x[f"{k}_s"] for x in steps]) for k in PHASES}
            s["median_wall_between_metrics_lines_s"] = med([x.get("wall_between_lines_s") for x in steps])
        else:
            g = med([x["generate_s"] for x in steps])
            s["phases_s"] = {"generate": g, "reward": med([x["reward_s"] for x in steps]),
                             "rest": med([x["step_s"] - x["generate_s"] for x in steps if x["generate_s"] is not None])}
            s["versions"] = side.get("versions")
        out[name] = s
    if ours and trl:
        out["ratio_ours_over_trl"] = out["ours"]["median_step_s"] / out["trl"]["median_step_s"]
    return out


def fmt(x, unit="s"):
    return "n/a" if x is None else f"{x:.2f} {unit}".rstrip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="RL steps per side (median over steps 3..N)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both sides (and TRL's torch threads)")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_trl")
    ap.add_argument("--only", choices=("ours", "trl"), help="run one side only")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per side before it is stopped")
    ap.add_argument("--json", type=Path, help="result file (default <workdir>/result.json)")
    ap.add_argument("--trl-allocator", choices=("same", "glibc"), default="same",
                    help="same: TRL runs under the allocator `megatron-vr1` preloads for itself (tcmalloc when "
                         "installed, megatron_vr1/allocator.py); glibc: TRL as a plain `python` runs it")
    a = ap.parse_args()
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from megatron_vr1.config import load_config

    cpu = processor_info()
    say(f"processor: {cpu['model']} ({os.cpu_count()} cores, avx512f={cpu['avx512f']}, avx2={cpu['avx2']}); "
        f"threads {a.threads}; {a.steps} steps")
    p = build(work)
    py = trl_venv(work) if a.only != "ours" else None

    cfg = load_config(ours_recipe(p, work, a.steps))  # our recipe; TRL gets the same values from it
    min_px, max_px = cfg.data.min_pixels, cfg.data.max_pixels
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    order = prompt_order(p["data"] / "rl_train.parquet", a.steps)
    ids = first_batch_prompt_ids(p["hf"], p["data"] / "rl_train.parquet", order, min_px, max_px)

    from megatron_vr1.allocator import env_with_tcmalloc, tcmalloc_path

    ours_alloc = "tcmalloc" if tcmalloc_path() and env.get("MEGATRON_VR1_TCMALLOC", "1") != "0" else "glibc"
    trl_env = env_with_tcmalloc(env) if a.trl_allocator == "same" and ours_alloc == "tcmalloc" else None
    trl_alloc = "tcmalloc" if trl_env or "tcmalloc" in env.get("LD_PRELOAD", "") else "glibc"
    ours = run_ours(p, work, a.steps, env, a.timeout) if a.only != "trl" else None
    trl = (run_trl(py, p, work, a.steps, a.threads, order, ids, trl_env or env, a.timeout, min_px, max_px, cfg.optim)
           if a.only != "ours" else None)

    s = summarize(ours, trl)
    print()
    print(f"processor: {cpu['model']}  avx512f={cpu['avx512f']} avx2={cpu['avx2']}  cores={cpu['cores']}  "
          f"threads={a.threads}  steps={a.steps}  allocator: ours {ours_alloc}, TRL {trl_alloc}")
    print(f"work: {PROMPTS} prompts x {GROUP} samples, max {MAX_TOKENS} new tokens, lr {LR:g}, no KL, "
          f"one optimizer step per rollout, fp32")
    if ours:
        o = s["ours"]
        ph = ", ".join(f"{k} {fmt(v)}" for k, v in o["phases_s"].items())
        print(f"ours (megatron-vr1 train): {fmt(o['median_step_s'], 's/step')} (median, {o['over']}); "
              f"phases: {ph} (wall between metrics lines {fmt(o['median_wall_between_metrics_lines_s'])}); tokens/step {o['tokens_per_step']}; start-up to end of step 1 "
              f"{fmt(o['startup_to_step1_end_s'])}")
    if trl:
        t = s["trl"]
        v = (t.get("versions") or {}).get("trl", "?")
        print(f"TRL {v} GRPOTrainer (HF generate): {fmt(t['median_step_s'], 's/step')} (median, {t['over']}); "
              f"generate {fmt(t['phases_s']['generate'])}, everything else {fmt(t['phases_s']['rest'])} "
              f"(reward {fmt(t['phases_s']['reward'])}); tokens/step {t['tokens_per_step']}; start-up to end of "
              f"step 1 {fmt(t['startup_to_step1_end_s'])}; prompt token ids of the first batch equal ours")
    if "ratio_ours_over_trl" in s:
        print(f"SUMMARY ours/TRL = {s['ratio_ours_over_trl']:.2f}x s/step "
              f"({s['ours']['median_step_s']:.2f} vs {s['trl']['median_step_s']:.2f} s) on {cpu['model']}")
    result = {"processor": cpu, "threads": a.threads, "steps": a.steps, "python": sys.version.split()[0],
              "allocator": {"ours": ours_alloc, "trl": trl_alloc},
              "work": {"prompts": PROMPTS, "group": GROUP, "max_tokens": MAX_TOKENS, "lr": LR,
                       "micro_batch": MICRO_BATCH, "seed": SEED},
              "summary": s, "ours": ours, "trl": trl}
    dest = a.json or work / "result.json"
    dest.write_text(json.dumps(result, indent=1))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
