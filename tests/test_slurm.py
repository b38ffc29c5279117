"""The Slurm launchers on a real single-node Slurm (munge + slurmctld + slurmd from Debian, started
by scripts/setup_slurm.sh): the tiny recipe's PTST chain with 2 trainer processes at TP=2 (one vLLM
engine of TP 2 spanning both, on the TP-friendly tiny model), a stage stopped by its time-limit
signal that saves, requeues and resumes (DP=2, one engine per process), a failing stage that
cancels the rest, and the 7B/32B/72B scripts checked with `sbatch --test-only` against 16 fake
8-GPU H800 nodes. Nothing is mocked; if Slurm cannot start the tests fail (not skip)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
SLURM_CPU = ["slurm.nodes=1", "slurm.gpus_per_node=0", "slurm.procs_per_node=2", "slurm.cpus_per_node=2",
             "slurm.mem=4G", "slurm.time_limit=00:15:00", "slurm.signal_seconds=60"]
STAGES = ("ptst.stages=[{max_response_length: 24, group_size: 4, steps: 4}, "
          "{max_response_length: 32, group_size: 2, steps: 1}]")
COMPARED = ("reward/mean", "reward/accuracy", "reward/format_rate", "rollout/len_mean", "rollout/len_max",
            "rollout/truncation_rate", "train/loss", "train/kl", "train/clip_frac", "train/entropy",
            "train/grad_norm", "mismatch/mean_abs", "ptst/stage", "ptst/group_size")


@pytest.fixture(scope="module")
def slurm_cluster():
    """Starts (or checks) the local cluster; a failure here fails every test with the reason."""
    r = subprocess.run(["bash", str(REPO / "scripts" / "setup_slurm.sh")], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        pytest.fail(f"the local Slurm cluster did not start (scripts/setup_slurm.sh, needs root and apt):\n"
                    f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}", pytrace=False)
    conf = r.stdout.split("SLURM_CONF=")[1].split(";")[0]
    os.environ["SLURM_CONF"] = conf
    return conf


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from megatron_vr1.data.synthetic import write_synthetic

    data = tmp_path_factory.mktemp("slurm_data")
    write_synthetic(data, n_train=40, n_val=8, n_test=8, n_sft=8, seed=0)
    return data


def _recipe(hf, mcore, data, *extra):
    return [f"model.hf_path={hf}", f"model.mcore_path={mcore}",
            f"data.train_path={data / 'rl_train.parquet'}", f"data.val_path={data / 'rl_val.parquet'}",
            "rollout.prompts_per_step=4", "grpo.minibatch_prompts=2", "parallel.micro_batch_size=4", STAGES,
            "checkpoint.save_interval=100", "logging.val_interval=0", *extra]


@pytest.fixture(scope="module")
def tiny_inputs(tiny_hf, tiny_mcore, tiny_data):
    """The tiny recipe at DP=2: 2 processes, one vLLM engine each."""
    return _recipe(tiny_hf, tiny_mcore, tiny_data)


@pytest.fixture(scope="module")
def tiny_inputs_tp(tiny_hf_tp, tiny_mcore_tp, tiny_data):
    """The same recipe at TP 2 on the job's 2 processes: trainer TP 2 and one rollout engine of TP 2
    (external_launcher; rollout.tensor_parallel_size follows parallel.tp) spanning both ranks, on
    the tiny model whose sizes divide by 2."""
    return _recipe(tiny_hf_tp, tiny_mcore_tp, tiny_data, "parallel.tp=2")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args, timeout=900, check=True):
    r = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=_env())
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, args[:3]))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _steps(run_dir: Path) -> dict[int, dict]:
    """Per-step metrics; a step logged twice (before and after a resume) counts with its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


def _logs(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm" / "logs").glob("*.out")))


def _assert_same_steps(got: dict, want: dict, steps: list[int]) -> None:
    assert sorted(got) == steps, sorted(got)
    for step in steps:
        for k in COMPARED:
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-6, abs=1e-9), (step, k, got[step][k], want[step][k])


def _run_without_slurm(inputs, run_dir: Path) -> dict[int, dict]:
    """The same recipe without Slurm: one torchrun of both stages, 2 processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_vr1.cli", "train", str(CONFIG), f"run_dir={run_dir}", *inputs]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return _steps(run_dir)


@pytest.fixture(scope="module")
def reference(tiny_inputs, tmp_path_factory):
    """The recipe without Slurm at DP=2 (TP 1)."""
    return _run_without_slurm(tiny_inputs, tmp_path_factory.mktemp("noslurm") / "rl")


@pytest.fixture(scope="module")
def reference_tp(tiny_inputs_tp, tmp_path_factory):
    """The recipe without Slurm at the chain test's layout: TP=2 on 2 processes."""
    return _run_without_slurm(tiny_inputs_tp, tmp_path_factory.mktemp("noslurm_tp") / "rl")


@pytest.mark.slow
def test_chain_runs_and_equals_the_run_without_slurm(slurm_cluster, tiny_inputs_tp, reference_tp, tmp_path):
    """Both stages as a chain of 2 jobs, each one torchrun of 2 processes (slurm.procs_per_node=2 on the
    node's 2 CPUs) at TP=2 with a rollout engine of TP 2: every step equals the TP=2 run without Slurm."""
    run_dir = tmp_path / "rl"
    r = _cli("slurm", "submit", CONFIG, f"run_dir={run_dir}", *tiny_inputs_tp, *SLURM_CPU, "--wait", "--poll", "1")
    out = r.stdout
    chain = json.loads((run_dir / "slurm" / "jobs.json").read_text())
    ids = [j["job_id"] for j in chain["jobs"]]
    assert [j["name"] for j in chain["jobs"]] == ["tiny-cpu-ptst1", "tiny-cpu-ptst2"]
    for job_id in ids:
        assert f"job {job_id:>8}" in out
    assert f"(after {ids[0]})" in out and "tensorboard --logdir" in out and "COMPLETED: every job" in out
    # stage 2 waited for stage 1 (afterok) and is cancelled if it fails
    script2 = (run_dir / "slurm" / "tiny-cpu-ptst2.sbatch").read_text()
    assert "ptst.stages[1].enabled=false" not in script2 and "--start-stage 1" in script2
    assert "#SBATCH --signal=B:USR1@60" in script2 and "#SBATCH --requeue" in script2
    logs = _logs(run_dir)
    assert "resumed from" in logs and "stage0_end" in logs  # the second job picked up the first one's checkpoint
    assert "parallel.tp=2" in script2 and "export VR1_PROCS_PER_NODE=2 " in script2  # one torchrun, 2 ranks, TP 2
    _assert_same_steps(_steps(run_dir), reference_tp, [1, 2, 3, 4, 5])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "stage1_end"


@pytest.mark.slow
def test_time_limit_signal_saves_requeues_and_resumes(slurm_cluster, tiny_inputs, reference, tmp_path):
    """SIGUSR1 to the batch shell (what `--signal=B:USR1@60` sends before the time limit): the
    trainer saves after its step, the job requeues itself, the next run resumes; nothing lost."""
    run_dir = tmp_path / "rl"
    _cli("slurm", "submit", CONFIG, f"run_dir={run_dir}", *tiny_inputs, *SLURM_CPU, "--stages", "1")
    job_id = json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"][0]["job_id"]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
        time.sleep(0.2)
    assert metrics.exists(), _logs(run_dir)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, env=_env())
    r = _cli("slurm", "status", run_dir, "--wait", "--poll", "1", check=False)
    assert r.returncode == 0, r.stdout + _logs(run_dir)
    row = [line for line in r.stdout.splitlines() if line.startswith("tiny-cpu-ptst1")][0]
    assert row.split()[2] == "COMPLETED" and row.split()[4] == "1", row  # restarted once
    logs = _logs(run_dir)
    assert "got SIGUSR1" in logs and "requeueing job" in logs, logs[-3000:]
    assert "resumed from" in logs and "stage0_step" in logs, logs[-3000:]
    _assert_same_steps(_steps(run_dir), reference, [1, 2, 3, 4])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "stage0_end"


@pytest.mark.slow
def test_failing_stage_cancels_the_rest_and_is_named(slurm_cluster, tiny_inputs, tmp_path):
    run_dir = tmp_path / "rl"
    bad = [*tiny_inputs, f"data.train_path={tmp_path / 'missing.parquet'}",
           "ptst.stages=[{max_response_length: 24, group_size: 4, steps: 1}, {max_response_length: 24, group_size: 4, "
           "steps: 1}, {max_response_length: 24, group_size: 4, steps: 1}]"]
    r = _cli("slurm", "submit", CONFIG, f"run_dir={run_dir}", *bad, *SLURM_CPU, "--wait", "--poll", "1", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED: tiny-cpu-ptst1" in r.stdout and "cancelled after it: tiny-cpu-ptst2, tiny-cpu-ptst3" in r.stdout, r.stdout
    s = _cli("slurm", "status", run_dir, check=False)
    assert s.returncode == 1 and "FAILED: tiny-cpu-ptst1" in s.stdout
    states = {line.split()[0]: line.split()[2] for line in s.stdout.splitlines() if line.startswith("tiny-cpu-ptst")}
    assert states == {"tiny-cpu-ptst1": "FAILED", "tiny-cpu-ptst2": "CANCELLED", "tiny-cpu-ptst3": "CANCELLED"}
    assert "missing.parquet" in _logs(run_dir)  # the job's log says why


@pytest.mark.parametrize("size", ["7b", "32b", "72b"])
def test_h800_scripts_pass_sbatch_test_only(slurm_cluster, size):
    arch = f"model.hf_path={REPO / 'configs' / 'arch' / f'qwen2.5-vl-{size}'}"
    r = _cli("slurm", "check", REPO / "configs" / f"qwen25vl_{size}_ptst.yaml", arch, "--partition", "h800",
             "--sft", REPO / "configs" / f"qwen25vl_{size}_sft.yaml", "--sft-override", arch, "--convert",
             "--eval-data", "/data/benchmarks")
    lines = r.stdout.strip().splitlines()
    assert [line.split()[1].rstrip(":").split("-ptst-")[1] for line in lines] == ["convert", "sft", "ptst1", "ptst2", "eval"]
    assert all(line.startswith("ok") and "in partition h800" in line for line in lines), r.stdout
    assert "on nodes h800-[01-08]" in lines[2]  # 8 nodes x 8 GPUs for a stage
    d = _cli("slurm", "submit", REPO / "configs" / f"qwen25vl_{size}_ptst.yaml", arch, "--partition", "h800",
             "slurm.container_image=nvcr.io#nvidia/pytorch:25.01-py3", "slurm.container_mounts=/lustre:/lustre",
             "--dry-run").stdout
    for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@600", "#SBATCH --partition=h800",
                 "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'",
                 "--container-mounts=/lustre:/lustre"):
        assert line in d, line
    assert d.count("\nsrun ") == 2 and "scontrol show hostnames" not in d  # thin: the rendezvous is in common.sh


def test_requests_the_h800_partition_cannot_hold_are_rejected(slurm_cluster):
    base = [REPO / "configs" / "qwen25vl_7b_ptst.yaml", f"model.hf_path={REPO / 'configs/arch/qwen2.5-vl-7b'}",
            "--partition", "h800", "--stages", "1"]
    for bad in ("slurm.nodes=17", "slurm.gpus_per_node=9"):
        r = _cli("slurm", "check", *base, bad, check=False)
        assert r.returncode == 1 and r.stdout.startswith("FAIL") and "not available" in r.stdout, (bad, r.stdout)
    r = _cli("slurm", "check", *base, "slurm.nodes=16")
    assert "on nodes h800-[01-16]" in r.stdout


def test_stage_selection_and_bad_values():
    from megatron_vr1.config import load_config
    from megatron_vr1.slurm.render import parse_stages, stage_overrides

    cfg = load_config(REPO / "configs" / "qwen25vl_7b_ptst.yaml")  # stage 3 (16K) disabled in the recipe
    assert parse_stages(None, cfg) == [0, 1]
    assert parse_stages("1-3", cfg) == [0, 1, 2] and parse_stages("2,3", cfg) == [1, 2]
    assert stage_overrides(cfg, [0, 1], 0) == (["ptst.stages[1].enabled=false"], 0)
    assert stage_overrides(cfg, [0, 1], 1) == ([], 1)
    assert stage_overrides(cfg, [0, 1, 2], 2) == (["ptst.stages[2].enabled=true"], 2)
    for bad in ("0", "4", "2-1", "x"):
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad, cfg)
    with pytest.raises(ValueError, match="slurm.time_limit"):
        load_config(REPO / "configs" / "qwen25vl_7b_ptst.yaml", ["slurm.time_limit=tomorrow"])
    with pytest.raises(ValueError, match="slurm.procs_per_node"):
        load_config(REPO / "configs" / "qwen25vl_7b_ptst.yaml", ["slurm.gpus_per_node=0"])


_AGREE = """
import os, signal, sys, torch.distributed as dist
from megatron_vr1 import preemption
stop = preemption.install()
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
first = stop.requested()                      # nobody signalled yet
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGUSR1)      # only rank 1 hears the time-limit signal
second = stop.requested()                     # ... both ranks stop after this step
print(first, second, flush=True)
try:
    preemption.exit_preempted()
finally:
    dist.destroy_process_group()
"""


def test_stop_flag_is_agreed_across_ranks():
    from distributed import _free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 75, err[-2000:]  # preemption.EXIT_PREEMPTED: the batch script requeues on it
        assert out.split() == ["False", "True"], out


@pytest.mark.slow
def test_sft_saves_on_sigusr1_and_resumes(tiny_hf, tiny_mcore, tmp_path):
    """The cold-start SFT loop honours the same signal: save after the step, exit 75, resume."""
    import signal

    from megatron_vr1.data.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, n_train=8, n_val=4, n_test=4, n_sft=64, seed=0)
    run_dir = tmp_path / "sft"
    cmd = [sys.executable, "-m", "megatron_vr1.cli", "sft", str(REPO / "configs" / "tiny_cpu_sft.yaml"),
           f"run_dir={run_dir}", f"model.hf_path={tiny_hf}", f"model.mcore_path={tiny_mcore}",
           f"sft.data_path={data / 'coldstart_sft.jsonl'}", f"sft.image_root={data}", "sft.global_batch_size=8",
           "sft.epochs=1", "checkpoint.save_interval=100"]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and "step 1/8" not in log.read_text():
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, log.read_text()[-3000:]
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert saved.startswith("sft_step_") and int(saved[-6:]) < 8
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / saved}" in r.stderr
    assert (run_dir / "checkpoints" / "sft_final").is_dir() and "sft step 8/8" in r.stdout  # the progress line


def test_rendered_scripts_take_python_from_the_job_venv(tmp_path):
    """No interpreter path is baked into the srun line: the job picks its Python in common.sh from
    MEGATRON_VR1_VENV, else the venv active at sbatch time, else the submitter's venv (rendered as
    the default); a container job uses the image's `python` unless MEGATRON_VR1_VENV is set."""
    from megatron_vr1.config import load_config
    from megatron_vr1.slurm.render import ptst_jobs

    def script(*overrides):
        cfg = load_config(CONFIG, list(overrides))
        return ptst_jobs(cfg, CONFIG, [], [0], prefix="t", log_dir=tmp_path, workdir=tmp_path)[0].script

    plain, boxed = script(), script("slurm.container_image=nvcr.io#nvidia/pytorch:25.01-py3")
    for s in (plain, boxed):
        assert '"$VR1_PYTHON" "${VR1_TORCHRUN[@]}"' in s and sys.executable not in s.split("\nsrun ")[1]
    assert f"VR1_DEFAULT_VENV={sys.prefix}" in plain and "VR1_IN_CONTAINER=0" in plain
    assert "VR1_DEFAULT_VENV=''" in boxed and "VR1_IN_CONTAINER=1" in boxed
    common = (REPO / "slurm" / "common.sh").read_text()
    block = common.split("# ---------------------------------------------------------------- Python")[1].split("# ----")[0]
    venv = tmp_path / "jobvenv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV={venv}\nexport PATH="{venv}/bin:$PATH"\n')

    def python_of(export_line: str, **env) -> str:
        base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MEGATRON_VR1_VENV")}
        r = subprocess.run(["bash", "-c", export_line + "\n" + block + '\necho "$VR1_PYTHON"'], capture_output=True,
                           text=True, env=dict(base, **env))
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    line = lambda s: next(x for x in s.splitlines() if x.startswith("export VR1_DEFAULT_VENV="))  # noqa: E731
    assert python_of(line(plain)) == f"{sys.prefix}/bin/python"
    assert python_of(line(plain), MEGATRON_VR1_VENV=str(venv)) == f"{venv}/bin/python"
    assert python_of(line(plain), VIRTUAL_ENV=str(venv)) == f"{venv}/bin/python"
    assert python_of(line(boxed), VIRTUAL_ENV=str(venv)) == "python"
    assert python_of(line(boxed), MEGATRON_VR1_VENV="/opt/venv") == "/opt/venv/bin/python"
