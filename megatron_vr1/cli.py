"""`megatron-vr1` command line.

Each subcommand lives in its own module, imported only when that subcommand runs, so
`megatron-vr1 --help` is instant and imports neither torch nor megatron. A command module offers
either
  - `add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args) -> int`; a command
    with its own subcommands (`convert hf-to-mcore|mcore-to-hf|verify`) adds them in
    add_arguments (`parser.add_subparsers(dest=..., required=True)`) and dispatches in run; or
  - `main(argv: list[str]) -> int`, which gets the arguments after the command name.
A command that takes a recipe calls `add_config_arguments(parser)` in add_arguments. The CLI then
loads the config (with the overrides), checks it against model.hf_path's architecture and hands
it over as `args.cfg` (Config) and `args.arch` (HFArch); with `--dry-run` it prints the resolved
config instead and `run` is not called.

User errors (ValueError, FileNotFoundError) print `error: <message>` and exit 2 without a
traceback; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

PROG = "megatron-vr1"

# name -> (module, one-line help). "config" is built in (module None).
COMMANDS: dict[str, tuple[str | None, str]] = {
    "config": (None, "print the resolved config of a recipe (with overrides) and check it"),
    "tiny-model": ("megatron_vr1.tiny_model", "build the tiny random Qwen2.5-VL for CPU runs"),
    "convert": ("checkpoints_conv.cli", "convert checkpoints: hf-to-mcore, mcore-to-hf, verify"),
    "coldstart": ("megatron_vr1.coldstart.cli", "build the cold-start CoT data (modality bridging)"),
    "sft": ("megatron_vr1.sft.cli", "cold-start supervised fine-tuning"),
    "train": ("megatron_vr1.rl.cli", "GRPO with PTST stages"),
    "eval": ("megatron_vr1.eval.cli", "score a checkpoint on the math benchmarks"),
    "slurm": ("megatron_vr1.slurm.cli", "submit a recipe to Slurm as a chain of jobs"),
    "plan": ("megatron_vr1.plan", "per-GPU memory estimate of a recipe; exit 2 with the fix when it does not fit"),
    "report": ("megatron_vr1.monitoring.report", "draw a run's curves into a PNG"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every command that takes a recipe."""
    parser.add_argument("config", help="recipe YAML, e.g. configs/tiny_cpu.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. optim.lr=1e-5 ptst.stages[0].steps=5 "
        "(paths relative to the current directory)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def quiet_libraries() -> None:
    """Console hygiene for every command: vLLM logs to stderr (stdout carries our progress lines and
    results), and megatron-core's import-time notices that are expected on this stack (no Apex /
    Transformer Engine on CPU) are dropped; real warnings still show."""
    import os
    import warnings

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    for text in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "Transformer Engine is not installed", "Detected Megatron Core"):
        warnings.filterwarnings("ignore", message=f".*{text}.*")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself (not a call from Python): tcmalloc first (allocator.py)
        from megatron_vr1.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc()
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_libraries()
    top = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv)  # prints help, or "invalid choice" and exits 2
        top.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    try:
        return _dispatch(name, rest)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _top_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=PROG,
        description="Vision-R1 (cold-start SFT + GRPO with PTST) for Qwen2.5-VL on Megatron-Core.",
        epilog=f"Run `{PROG} COMMAND --help` for a command's arguments.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return top


def _dispatch(name: str, rest: list[str]) -> int:
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=help_text)
    if module_name is None:  # the built-in `config`
        add_config_arguments(parser)
        args = _parse(parser, rest)
        _print_config(args, rl=None)
        return 0
    module = _import_command(name, module_name)
    if not hasattr(module, "add_arguments") and hasattr(module, "main"):
        return int(module.main(rest) or 0)
    module.add_arguments(parser)
    args = _parse(parser, rest)
    if hasattr(args, "dry_run") and hasattr(args, "overrides"):
        if args.dry_run:
            _print_config(args, rl=_is_rl(name))
            return 0
        from megatron_vr1.config import load_config, load_hf_arch

        args.cfg = load_config(args.config, args.overrides)
        args.arch = load_hf_arch(args.cfg.model.hf_path)
        args.cfg.validate_against(args.arch, rl=_is_rl(name))
    return int(module.run(args) or 0)


def _parse(parser: argparse.ArgumentParser, rest: list[str]) -> argparse.Namespace:
    """parse_args, but KEY=VALUE overrides may also come after options (`CONFIG --dry-run a.b=1`)."""
    args, extra = parser.parse_known_args(rest)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _import_command(name: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"`{PROG} {name}` is not available in this version (module {module_name} does not exist yet)"
            ) from None
        if e.name and e.name.split(".")[0] in ("megatron_vr1", "checkpoints_conv"):
            raise  # one of our modules imports a missing one of ours: a bug, keep the traceback
        raise ValueError(
            f"`{PROG} {name}` needs the Python package {e.name!r}, which is not installed; "
            "install the stack with scripts/setup.sh"
        ) from None


def _is_rl(command: str) -> bool:
    """Whether a command runs RL (and so the PTST stages' lengths must fit the model)."""
    return command not in ("sft", "coldstart")


def _print_config(args: argparse.Namespace, rl: bool | None) -> None:
    """Prints the resolved YAML; checks it against the architecture when model.hf_path exists.
    rl=None (`config`): an SFT recipe (sft.data_path set, no data.train_path) skips the RL checks."""
    from megatron_vr1.config import load_config, load_hf_arch

    cfg = load_config(args.config, args.overrides)
    if rl is None:
        rl = not (cfg.sft.data_path is not None and cfg.data.train_path is None)
    if (Path(cfg.model.hf_path) / "config.json").is_file():
        cfg.validate_against(load_hf_arch(cfg.model.hf_path), rl=rl)
    else:
        print(
            f"note: {cfg.model.hf_path} has no config.json yet; checks against the architecture skipped",
            file=sys.stderr,
        )
    sys.stdout.write(cfg.to_yaml())


if __name__ == "__main__":
    sys.exit(main())
