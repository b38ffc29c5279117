"""`megatron-vr1 train CONFIG [overrides] [--start-stage K]`: GRPO with PTST."""

from __future__ import annotations

import logging


def add_arguments(parser) -> None:
    from megatron_vr1.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--start-stage", type=int, default=0,
                        help="first PTST stage to run (0-based) when not resuming; set model.mcore_path to the "
                             "previous stage's checkpoint")


def run(args) -> int:
    from megatron_vr1.rl.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(args.cfg, args.arch, start_stage=args.start_stage)
    return 0
