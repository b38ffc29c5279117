"""Render the sbatch scripts of a recipe from the templates in slurm/.

A template is a plain sbatch file with `{{NAME}}` placeholders; an `#SBATCH` line whose
placeholder renders empty is dropped (no partition, no GPUs, ...). The resources come from the
recipe's `slurm` section, the layout from `parallel`. Values are shell-quoted.

PTST stages are numbered from 1, as in the paper, over the recipe's `ptst.stages` list. The job of
stage k runs the same `train` command as a run without Slurm, with the stages after k disabled
(`ptst.stages[j].enabled=false`), so it stops at the end of stage k; the next job resumes from the
checkpoint stage k ended with. Every job of the chain writes into the same run_dir.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


@dataclass
class Job:
    name: str
    """Job name (sbatch --job-name), also the script's file name."""
    kind: str
    """convert | sft | ptst | eval."""
    script: str
    """The rendered sbatch script."""
    label: str = ""
    """What the job does, for the status table (e.g. 'PTST stage 2 (8192 tokens, G=8)')."""
    extra: dict = field(default_factory=dict)


def parse_stages(text: str | None, cfg) -> list[int]:
    """`--stages` (1-based, "2", "1-3" or "1,3") -> 0-based positions in ptst.stages; default:
    the recipe's enabled stages."""
    n = len(cfg.ptst.stages)
    if text is None:
        return [i for i, s in enumerate(cfg.ptst.stages) if s.enabled]
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--stages {text!r}: use a stage number, a range or a list, e.g. --stages 1-3 or 2,3")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 1 <= lo <= hi <= n:
            raise ValueError(f"--stages {text!r}: the recipe has stages 1..{n} (ptst.stages); pick within them")
        out += range(lo - 1, hi)
    return sorted(set(out))


def stage_overrides(cfg, selected: list[int], position: int) -> tuple[list[str], int]:
    """Overrides that make a `train` run stop after stage `position`, and the --start-stage (an
    index among the enabled stages) it starts at when the run has no checkpoint yet."""
    enabled = {i for i, s in enumerate(cfg.ptst.stages) if s.enabled} | set(selected)
    overrides = []
    for i, s in enumerate(cfg.ptst.stages):
        want = i in enabled and i <= position
        if want != s.enabled:
            overrides.append(f"ptst.stages[{i}].enabled={'true' if want else 'false'}")
    start = sum(1 for i in enabled if i < position)
    return overrides, start


def render(template: str, values: dict[str, object]) -> str:
    text = (TEMPLATES / template).read_text()
    lines = []
    for line in text.splitlines():
        names = _PLACEHOLDER.findall(line)
        for name in names:
            if name not in values:
                raise KeyError(f"slurm/{template}: no value for {{{{{name}}}}}")  # a bug here
        if line.startswith("#SBATCH") and any(values[n] in (None, "", 0) for n in names):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(lines) + "\n"


def _q(value) -> str:
    return shlex.quote(str(value))


def common_values(cfg, config_path: Path, *, name: str, log_dir: Path, workdir: Path) -> dict[str, object]:
    s = cfg.slurm
    # The job's Python is chosen in the job (slurm/common.sh): $MEGATRON_VR1_VENV if set for the
    # job, else (no container) the venv active at sbatch time ($VIRTUAL_ENV), else the venv this
    # render ran in, else `python` on PATH (a container: the image's Python).
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    default_venv = "" if s.container_image or not in_venv else str(Path(sys.prefix).absolute())
    container = []
    if s.container_image:
        container.append(f"--container-image={_q(s.container_image)}")
        if s.container_mounts:
            container.append(f"--container-mounts={_q(s.container_mounts)}")
        container.append(f"--container-workdir={_q(workdir)}")
    return {
        "JOB_NAME": name,
        "PARTITION": s.partition or "",
        "ACCOUNT": s.account or "",
        "QOS": s.qos or "",
        "NODES": s.nodes,
        "GPUS_PER_NODE": s.gpus_per_node,
        "CPUS_PER_TASK": s.cpus_per_node,
        "EXCLUSIVE": "" if s.cpus_per_node else "--exclusive",
        "MEM": s.mem,
        "TIME": s.time_limit,
        "SIGNAL_SECONDS": s.signal_seconds,
        "MAX_REQUEUES": s.max_requeues,
        "PROCS_PER_NODE": s.procs,
        "WORKDIR": _q(workdir),
        "LOG_DIR": _q(log_dir),
        "REPO": _q(REPO),
        "CONTAINER": " ".join(container),
        "PYTHON": '"$VR1_PYTHON"',
        "DEFAULT_VENV": _q(default_venv),
        "IN_CONTAINER": 1 if s.container_image else 0,
        "CONFIG": _q(Path(config_path).absolute()),
    }


def ptst_jobs(cfg, config_path: Path, overrides: list[str], selected: list[int], *, prefix: str,
              log_dir: Path, workdir: Path) -> list[Job]:
    jobs = []
    for pos in selected:
        stage = cfg.ptst.stages[pos]
        extra, start = stage_overrides(cfg, selected, pos)
        name = f"{prefix}-ptst{pos + 1}"
        values = common_values(cfg, config_path, name=name, log_dir=log_dir, workdir=workdir)
        values.update(START_STAGE=start, OVERRIDES=" ".join(_q(o) for o in [*overrides, *extra]))
        label = f"PTST stage {pos + 1} ({stage.max_response_length} tokens, G={stage.group_size}, {stage.steps} steps)"
        jobs.append(Job(name, "ptst", render("ptst_stage.sbatch", values), label, {"stage": pos + 1}))
    return jobs


def sft_job(cfg, config_path: Path, overrides: list[str], *, prefix: str, log_dir: Path, workdir: Path) -> Job:
    name = f"{prefix}-sft"
    values = common_values(cfg, config_path, name=name, log_dir=log_dir, workdir=workdir)
    values.update(OVERRIDES=" ".join(_q(o) for o in overrides))
    return Job(name, "sft", render("sft.sbatch", values), f"cold-start SFT ({cfg.sft.epochs} epochs)")


def convert_job(cfg, config_path: Path, *, prefix: str, log_dir: Path, workdir: Path) -> Job:
    """HF (model.hf_path) -> Megatron (model.mcore_path) at the recipe's TP/PP: the SFT recipe's input."""
    if cfg.model.mcore_path is None:
        raise ValueError("--convert writes model.mcore_path of the SFT recipe, which is not set; set it")
    name = f"{prefix}-convert"
    values = common_values(cfg, config_path, name=name, log_dir=log_dir, workdir=workdir)
    values.update(HF=_q(cfg.model.hf_path), MCORE_OUT=_q(cfg.model.mcore_path), TP=cfg.parallel.tp,
                  PP=cfg.parallel.pp)
    return Job(name, "convert", render("convert.sbatch", values), "HF -> Megatron conversion")


def eval_job(cfg, config_path: Path, *, data: Path, bench: str, prefix: str, log_dir: Path, workdir: Path) -> Job:
    """`megatron-vr1 eval` of the run's best checkpoint (checkpoints/best) into RUN/eval."""
    name = f"{prefix}-eval"
    values = common_values(cfg, config_path, name=name, log_dir=log_dir, workdir=workdir)
    run_dir = Path(cfg.run_dir)
    values.update(MODEL=_q(run_dir / "checkpoints" / "best"), BENCH=_q(bench), DATA=_q(Path(data).absolute()),
                  OUT=_q(run_dir / "eval"))
    return Job(name, "eval", render("eval.sbatch", values), f"benchmark evaluation ({bench})")
