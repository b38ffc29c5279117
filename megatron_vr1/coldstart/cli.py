"""`megatron-vr1 coldstart CONFIG [overrides]`: the cold-start set by modality bridging.

    megatron-vr1 coldstart RECIPE [--shard K]                  # all shards, or one (one worker per shard)
    megatron-vr1 coldstart RECIPE --loop [--stop-after STEP]   # the OpenVLThinker loop
    megatron-vr1 coldstart RECIPE --loop --plan                # its steps, done or to do
    megatron-vr1 coldstart RECIPE --regenerate HF_DIR --out DIR  # one regeneration step by hand

Every setting is in the recipe's `coldstart` section (`megatron-vr1 config RECIPE` prints them).
A rerun continues where the last one stopped. Prints the summary JSON (or the plan).
"""

from __future__ import annotations

import json
import logging


def add_arguments(parser) -> None:
    from megatron_vr1.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--shard", type=int, default=None, metavar="K",
                        help="process only shard K of coldstart.num_shards (the output is assembled by whichever "
                             "run finds every shard complete)")
    parser.add_argument("--loop", action="store_true", help="run the OpenVLThinker loop (coldstart.loop)")
    parser.add_argument("--plan", action="store_true", help="with --loop: print the steps and whether each is done")
    parser.add_argument("--stop-after", default=None, metavar="STEP",
                        help="with --loop: stop after this step (e.g. rl1, regenerate1)")
    parser.add_argument("--regenerate", default=None, metavar="HF_DIR",
                        help="regenerate the SFT data with the model in HF_DIR (one loop step)")
    parser.add_argument("--out", default=None, metavar="DIR", help="with --regenerate: the output folder")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = args.cfg
    if args.loop:
        from megatron_vr1.coldstart.loop import format_plan, plan, run_loop

        if args.plan:
            print(format_plan(plan(cfg, args.config, args.overrides)))
            return 0
        steps = run_loop(cfg, args.config, args.overrides, stop_after=args.stop_after)
        print(format_plan(steps))
        return 0
    if args.plan or args.stop_after:
        raise ValueError("--plan and --stop-after go with --loop")
    if args.regenerate is not None:
        from megatron_vr1.coldstart.regenerate import regenerate

        if args.out is None:
            raise ValueError("--regenerate needs --out DIR (the folder of the new SFT data)")
        summary = regenerate(cfg, args.regenerate, args.out)
    else:
        from megatron_vr1.coldstart.bridge import check_models, run_bridge

        check_models(cfg)
        summary = run_bridge(cfg, shard=args.shard)
    if summary is not None:
        print(json.dumps({k: v for k, v in summary.items() if k != "details"}))
    return 0
