"""The OpenVLThinker loop as a pipeline of resumable steps (`megatron-vr1 coldstart CONFIG --loop`).

Round i = 1..N (coldstart.loop.iterations), folders under run_dir:
  sft<i>         megatron-vr1 sft <loop.sft_recipe> on data_i          -> round<i>/sft/checkpoints/sft_final
  rl<i>          megatron-vr1 train <loop.rl_recipe> from that SFT model -> round<i>/rl/checkpoints/{best,latest}
  export<i>      megatron-vr1 convert mcore-to-hf of the RL model (best on validation, else latest) -> round<i>/hf
  regenerate<i>  the RL model rewrites the SFT data (regenerate.py)    -> round<i+1>/data/coldstart_messages.jsonl
(export and regenerate only for i < N). data_1 is the SFT recipe's sft.data_path (e.g. the
modality-bridging output). SFT of round i > 1 starts from the SFT recipe's model.mcore_path
(loop.sft_from=base, OpenVLThinker) or from round i-1's RL model (previous).

Each step runs as a child process of the ordinary CLI (vLLM and megatron-core keep process-wide
state; a child also makes each step restartable on its own), and a step that finished writes
`<its folder>/.step_done.json`; a rerun skips every step with that marker, and a step that was
interrupted resumes by itself (SFT and GRPO from their checkpoints, regeneration from its shards).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_vr1.coldstart.store import atomic_write_text

log = logging.getLogger("megatron_vr1.coldstart")

DONE = ".step_done.json"


@dataclass
class Step:
    name: str
    folder: Path
    """Where the step writes; holds the done marker."""
    command: list[str]
    """The CLI arguments after `megatron-vr1`."""

    @property
    def done(self) -> bool:
        return (self.folder / DONE).is_file()


def plan(cfg, config_path: str, overrides: list[str]) -> list[Step]:
    """The loop's steps, in order (pure: reads nothing but the config and the recipes' own data path)."""
    from megatron_vr1.config import load_config

    loop = cfg.coldstart.loop
    for key in ("sft_recipe", "rl_recipe"):
        path = getattr(loop, key)
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"coldstart.loop.{key} ({path}) is not a recipe file; point it at e.g. "
                                    f"configs/tiny_cpu{'_sft' if key == 'sft_recipe' else ''}.yaml")
    sft_cfg = load_config(loop.sft_recipe)  # checks the recipe now, not after an hour of training
    load_config(loop.rl_recipe)
    if sft_cfg.sft.data_path is None:
        raise ValueError(f"{loop.sft_recipe}: sft.data_path is not set; the first round trains on it "
                         "(e.g. the `megatron-vr1 coldstart` output coldstart_llava_cot.jsonl)")
    root = Path(cfg.run_dir)
    steps, data = [], None
    for i in range(1, loop.iterations + 1):
        rnd = root / f"round{i}"
        sft_over = [f"run_dir={rnd / 'sft'}"]
        if data is not None:
            sft_over += [f"sft.data_path={data}", f"sft.image_root={data.parent}"]
            if loop.sft_from == "previous":
                sft_over.append(f"model.mcore_path={root / f'round{i - 1}' / 'rl' / 'checkpoints' / 'model_to_export'}")
        sft_final = rnd / "sft" / "checkpoints" / "sft_final"
        steps.append(Step(f"sft{i}", rnd / "sft", ["sft", str(loop.sft_recipe), *sft_over]))
        steps.append(Step(f"rl{i}", rnd / "rl", ["train", str(loop.rl_recipe), f"run_dir={rnd / 'rl'}",
                                                  f"model.mcore_path={sft_final}"]))
        if i == loop.iterations:
            break
        steps.append(Step(f"export{i}", rnd / "hf", ["convert", "mcore-to-hf", "--mcore",
                                                     str(rnd / "rl" / "checkpoints" / "model_to_export"),
                                                     "--out", str(rnd / "hf"), "--overwrite", "--no-progress"]))
        data_dir = root / f"round{i + 1}" / "data"
        steps.append(Step(f"regenerate{i}", data_dir, ["coldstart", config_path, *overrides,
                                                       "--regenerate", str(rnd / "hf"), "--out", str(data_dir)]))
        data = data_dir / "coldstart_messages.jsonl"
    return steps


def export_source(rl_run: Path) -> Path:
    """The RL checkpoint to export: `best` on validation if the run kept one, else `latest`."""
    ckpts = rl_run / "checkpoints"
    if (ckpts / "best").is_dir():
        return ckpts / "best"
    latest = ckpts / "latest"
    if latest.is_file():
        return ckpts / latest.read_text().strip()
    raise FileNotFoundError(f"{ckpts} has no best or latest checkpoint; did the RL step finish?")


def _resolve(step: Step) -> list[str]:
    """Fill in the RL checkpoint a step depends on (known only once the RL step ran)."""
    out = []
    for arg in step.command:
        if arg.endswith("model_to_export"):
            marker = arg.split("=", 1)
            path = export_source(Path(marker[-1]).parent.parent)
            arg = f"{marker[0]}={path}" if len(marker) == 2 else str(path)
        out.append(arg)
    return out


def run_loop(cfg, config_path: str, overrides: list[str], stop_after: Optional[str] = None) -> list[Step]:
    """Run every step without a done marker, in order; returns the plan."""
    steps = plan(cfg, config_path, overrides)
    names = [s.name for s in steps]
    if stop_after is not None and stop_after not in names:
        raise ValueError(f"--stop-after {stop_after!r} is not a step of this loop; steps: {', '.join(names)}")
    for step in steps:
        if step.done:
            log.info("loop: %s done already, skipped (%s)", step.name, step.folder / DONE)
        else:
            args = _resolve(step)
            log.info("loop: %s: megatron-vr1 %s", step.name, " ".join(args))
            t0 = time.monotonic()
            rc = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", *args]).returncode
            if rc != 0:
                raise RuntimeError(f"loop step {step.name} failed (exit code {rc}); fix the cause and rerun the "
                                   "loop: finished steps are skipped, this one resumes")
            step.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(step.folder / DONE, json.dumps(
                {"step": step.name, "command": args, "seconds": round(time.monotonic() - t0, 1)}, indent=2) + "\n")
        if step.name == stop_after:
            log.info("loop: stopped after %s (--stop-after); rerun without it to continue", step.name)
            break
    return steps


def format_plan(steps: list[Step]) -> str:
    return "\n".join(f"{'done' if s.done else 'todo'}  {s.name:<14} {s.folder}" for s in steps)
