"""`megatron-vr1 sft CONFIG [overrides] [--stop-after-step N]`: cold-start supervised fine-tuning.

Runs on one process (a one-rank gloo/nccl group is made) or under torchrun
(`torchrun --nproc-per-node 8 -m megatron_vr1.cli sft RECIPE`). Resumes from the newest
checkpoint in `run_dir`.
"""

from __future__ import annotations

import logging


def add_arguments(parser) -> None:
    from megatron_vr1.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--stop-after-step", type=int, default=None, metavar="N",
                        help="end after optimizer step N with a resumable checkpoint (the schedule still spans "
                             "all sft.epochs); rerun without it to continue")


def run(args) -> int:
    from megatron_vr1.sft.loop import run_sft

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = run_sft(args.cfg, args.arch, stop_after_step=args.stop_after_step)
    print(path)
    return 0
