"""`megatron-vr1 slurm`: submit a recipe to Slurm as a chain of jobs, and follow it.

    megatron-vr1 slurm submit CONFIG [KEY=VALUE ...] [--stages 1-3] [--sft SFT_CONFIG [--convert]]
                              [--eval-data DIR [--eval-bench mathvista,...]] [--partition P] [--account A]
                              [--after JOBID] [--dry-run] [--wait]
    megatron-vr1 slurm status RUN_DIR|CONFIG [--wait] [--poll 10] [--timeout S]
    megatron-vr1 slurm check CONFIG [KEY=VALUE ...] [--stages ...]   # sbatch --test-only of each script

submit renders one sbatch script per job (slurm/*.sbatch templates) into RUN/slurm/, submits them
as a chain (each `--dependency=afterok:<previous>` with `--kill-on-invalid-dep=yes`, so a failed
job cancels the rest), records the chain in RUN/slurm/jobs.json and prints the job ids, the status
command and the TensorBoard command. `--dry-run` prints the scripts and submits nothing.
status (and submit --wait) polls the scheduler until the chain ends and names the job that
failed; exit status 0 when every job completed, 1 when one failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megatron-vr1 slurm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)

    s = sub.add_parser("submit", help="render the recipe's sbatch scripts and submit them as a chain")
    _recipe_args(s)
    s.add_argument("--after", metavar="JOBID", help="start the chain after this job completed successfully")
    s.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    s.add_argument("--wait", action="store_true", help="then poll until the chain ends (as `slurm status --wait`)")
    s.add_argument("--poll", type=float, default=10.0, help="seconds between polls with --wait")

    c = sub.add_parser("check", help="validate the scripts with `sbatch --test-only` (nothing is submitted)")
    _recipe_args(c)

    st = sub.add_parser("status", help="state of a submitted chain; names the job that failed")
    st.add_argument("run", help="the run_dir of a submitted recipe, or the recipe itself")
    st.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the recipe's overrides (for its run_dir)")
    st.add_argument("--wait", action="store_true", help="poll until the chain ends")
    st.add_argument("--poll", type=float, default=10.0, help="seconds between polls")
    st.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 3)")

    args, extra = p.parse_known_args(argv)  # KEY=VALUE overrides may also come after options
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return {"submit": submit, "check": check, "status": status}[args.action](args)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="GRPO/PTST recipe, e.g. configs/qwen25vl_7b_ptst.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, passed to every job")
    p.add_argument("--stages", help="PTST stages to run, numbered from 1: 2, 1-3 or 1,3 (default: the enabled ones)")
    p.add_argument("--partition", help="Slurm partition (overrides slurm.partition)")
    p.add_argument("--account", help="Slurm account (overrides slurm.account)")
    p.add_argument("--sft", type=Path, metavar="SFT_CONFIG", help="run this cold-start SFT recipe first")
    p.add_argument("--sft-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of the SFT recipe (repeat it)")
    p.add_argument("--convert", action="store_true",
                   help="before the SFT: convert the SFT recipe's model.hf_path into its model.mcore_path")
    p.add_argument("--eval-data", type=Path, metavar="DIR", help="after the last stage: megatron-vr1 eval of "
                   "checkpoints/best on the benchmarks in DIR")
    p.add_argument("--eval-bench", default="mathvista,mathverse,mmmath", help="benchmarks of the eval job")
    p.add_argument("--no-plan-check", action="store_true",
                   help="submit even when `megatron-vr1 plan` says a job does not fit the GPUs' memory")


# ----------------------------------------------------------------------------- rendering


def _load(config: Path, overrides: list[str], args) -> "Config":  # noqa: F821
    from megatron_vr1.config import load_config, load_hf_arch

    extra = [f"slurm.{k}={v}" for k, v in (("partition", args.partition), ("account", args.account)) if v]
    cfg = load_config(config, [*overrides, *extra])
    arch = load_hf_arch(cfg.model.hf_path)
    rl = not (cfg.sft.data_path is not None and cfg.data.train_path is None)  # an SFT recipe runs no engine
    cfg.validate_against(arch, rl=rl)  # errors now, not hours later in the queue (the rollout TP included)
    cfg.parallel.dp(cfg.slurm.world_size)
    if rl:
        from megatron_vr1.rollout.layout import check_world, rollout_tp

        check_world(cfg.slurm.world_size, rollout_tp(cfg))  # engine replicas of rollout-TP consecutive ranks
    if cfg.slurm.gpus_per_node > 0 and not getattr(args, "no_plan_check", False):
        from megatron_vr1.plan import check_fits

        check_fits(cfg, arch, where=str(config))  # an OOM found before the queue, with the fix
    return cfg


def build_jobs(args) -> tuple["Config", list]:  # noqa: F821
    """The chain's jobs, rendered: [convert] [sft] ptst stages [eval]."""
    from megatron_vr1.slurm import render

    overrides = list(args.overrides)
    cfg = _load(args.config, overrides, args)
    run_dir = Path(cfg.run_dir)
    prefix = _prefix(args.config)
    log_dir = run_dir / "slurm" / "logs"
    workdir = Path.cwd()
    jobs = []
    sft_path = args.sft
    if args.convert and sft_path is None:
        raise ValueError("--convert converts the SFT recipe's model: give --sft SFT_CONFIG too")
    if sft_path is not None:
        sft_cfg = _load(sft_path, args.sft_override, args)
        kw = dict(prefix=prefix, log_dir=log_dir, workdir=workdir)
        if args.convert:
            jobs.append(render.convert_job(sft_cfg, sft_path, **kw))
        jobs.append(render.sft_job(sft_cfg, sft_path, args.sft_override, **kw))
    selected = render.parse_stages(args.stages, cfg)
    jobs += render.ptst_jobs(cfg, args.config, overrides, selected, prefix=prefix, log_dir=log_dir, workdir=workdir)
    if args.eval_data is not None:
        jobs.append(render.eval_job(cfg, args.config, data=args.eval_data, bench=args.eval_bench, prefix=prefix,
                                    log_dir=log_dir, workdir=workdir))
    return cfg, jobs


def _prefix(config: Path) -> str:
    return Path(config).stem.replace("_", "-")


# ----------------------------------------------------------------------------- actions


def submit(args) -> int:
    from megatron_vr1.slurm import scheduler

    cfg, jobs = build_jobs(args)
    run_dir = Path(cfg.run_dir)
    if args.dry_run:
        for job in jobs:
            print(f"# ===== {job.name}: {job.label}")
            sys.stdout.write(job.script)
        return 0
    folder = run_dir / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    records, prev = [], args.after
    for job in jobs:
        script = folder / f"{job.name}.sbatch"
        script.write_text(job.script)
        try:
            job_id = scheduler.sbatch(script, after=prev)
        except scheduler.SlurmError as e:
            if records:
                scheduler.write_chain(run_dir, Path(args.config).absolute(), records)
            done = " ".join(r["job_id"] for r in records)
            raise ValueError(f"{e}" + (f"; already submitted: {done} (scancel {done} to drop them)" if done else "")) from None
        records.append({"name": job.name, "kind": job.kind, "label": job.label, "job_id": job_id,
                        "script": str(script), "log": str(folder / "logs" / f"{job.name}-{job_id}.out"),
                        "after": prev})
        print(f"submitted {job.name:<24} job {job_id:>8}" + (f"  (after {prev})" if prev else "") + f"  {job.label}")
        prev = job_id
    scheduler.write_chain(run_dir, Path(args.config).absolute(), records)
    print(f"chain:       {folder / scheduler.JOBS_FILE}")
    print(f"status:      megatron-vr1 slurm status {shlex.quote(str(run_dir))} [--wait]")
    print(f"tensorboard: tensorboard --logdir {shlex.quote(str(run_dir / 'tensorboard'))}")
    if args.wait:
        return _wait(run_dir, args.poll, None)
    return 0


def check(args) -> int:
    """`sbatch --test-only` of every script of the chain against the cluster's partitions."""
    import tempfile

    from megatron_vr1.slurm import scheduler

    _, jobs = build_jobs(args)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            script = Path(tmp) / f"{job.name}.sbatch"
            script.write_text(job.script)
            ok, msg = scheduler.test_only(script)
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {job.name}: {msg}")
    return 1 if bad else 0


def status(args) -> int:
    run_dir = _run_dir(args.run, args.overrides)
    if args.wait:
        return _wait(run_dir, args.poll, args.timeout)
    from megatron_vr1.slurm import scheduler

    st = scheduler.chain_status(scheduler.read_chain(run_dir))
    print(scheduler.describe(st))
    return 1 if st.failed is not None else 0


def _run_dir(run: str, overrides: list[str]) -> Path:
    path = Path(run)
    if path.is_file():
        from megatron_vr1.config import load_config

        return Path(load_config(path, overrides).run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{run} is neither a run folder nor a recipe file")
    return path


def _wait(run_dir: Path, poll: float, timeout) -> int:
    from megatron_vr1.slurm import scheduler

    chain = scheduler.read_chain(run_dir)

    def show(st):
        states = ", ".join(f"{r['name']}={r['state']}" + (f"(restarts {r['restarts']})" if r["restarts"] else "")
                           for r in st.rows)
        print(f"[{_now()}] {states}", flush=True)

    try:
        st = scheduler.wait_chain(chain, poll_s=poll, timeout_s=timeout, on_change=show)
    except TimeoutError as e:
        print(e)
        return 3
    print(scheduler.describe(st))
    return 0 if st.ok else 1


def _now() -> str:
    import time

    return time.strftime("%H:%M:%S")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
