"""`megatron-vr1 convert hf-to-mcore | mcore-to-hf | verify`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF folder -> Megatron distributed checkpoint (loads at any TP/PP)")
    a.add_argument("--hf", required=True, help="HF Qwen2.5-VL folder (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output folder (model/, hf/, megatron_vr1.json)")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size to check and record as the default")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size to check and record as the default")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint (converted or trained) -> HF folder")
    b.add_argument("--mcore", required=True, help="folder written by hf-to-mcore, or a torch_dist checkpoint folder")
    b.add_argument("--out", required=True, help="output HF folder")
    b.add_argument("--hf-config", help="HF folder with config/tokenizer (default: <mcore>/hf)")
    b.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the weights (default: keep the checkpoint's dtype)")
    b.add_argument("--key-scheme", choices=["hub", "canonical"],
                   help="HF tensor names: hub (model.*/visual.*, as transformers saves) or canonical "
                        "(model.language_model.*); default: the source's scheme, else hub")
    b.add_argument("--max-shard-gib", type=float, default=5.0, help="split the safetensors into files of this size")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    v = sub.add_parser("verify", help="Megatron vs transformers logits on probe prompts (text and images)")
    v.add_argument("--hf", required=True)
    v.add_argument("--mcore", required=True)
    v.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit diff allowed (fp32)")
    v.add_argument("--tp", type=int, default=1, help="needs that many processes (torchrun) when > 1")
    v.add_argument("--pp", type=int, default=1, help="needs that many processes (torchrun) when > 1")
    v.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    if args.direction == "hf-to-mcore":
        from checkpoints_conv.convert import hf_to_mcore

        s = hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, overwrite=args.overwrite,
                        progress=not args.no_progress)
        print(f"wrote {args.out}: {s.tensors} tensors, {s.bytes / 1e9:.3f} GB in {s.seconds:.1f} s ({s.gbps:.2f} GB/s)")
        return 0
    if args.direction == "mcore-to-hf":
        import torch

        from checkpoints_conv.convert import mcore_to_hf

        dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
        s = mcore_to_hf(args.mcore, args.out, hf_config=args.hf_config, dtype=dtype, key_scheme=args.key_scheme,
                        max_shard_bytes=int(args.max_shard_gib * 2**30), overwrite=args.overwrite,
                        progress=not args.no_progress)
        print(f"wrote {args.out}: {s.tensors} tensors, {s.bytes / 1e9:.3f} GB in {s.seconds:.1f} s ({s.gbps:.2f} GB/s)")
        return 0
    return _verify(args)


def _verify(args) -> int:
    from checkpoints_conv.arch import load_hf_arch
    from checkpoints_conv.convert import model_dir_of

    # bad inputs fail here, before any process group or model is built
    if not (Path(args.hf) / "config.json").is_file():
        raise FileNotFoundError(f"--hf {args.hf} has no config.json; pass the HF folder the checkpoint came from")
    load_hf_arch(args.hf)
    model_dir_of(args.mcore)
    from megatron_vr1 import platform

    platform.setup()
    import torch.distributed as dist
    from megatron.core import parallel_state

    from checkpoints_conv.verify import compare

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp * args.pp > world or world % (args.tp * args.pp):
        raise ValueError(f"--tp {args.tp} --pp {args.pp} needs a multiple of {args.tp * args.pp} processes, got "
                         f"{world}; run: torchrun --nproc-per-node {args.tp * args.pp} -m megatron_vr1.cli convert verify ...")
    if not dist.is_initialized():
        if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # plain one-process run
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(s.getsockname()[1])
        dist.init_process_group(platform.backend(), rank=int(os.environ.get("RANK", "0")), world_size=world)
    parallel_state.initialize_model_parallel(args.tp, args.pp)
    platform.model_parallel_seed(0)
    diffs = compare(args.hf, args.mcore, tp=args.tp, pp=args.pp)
    ok = all(d <= args.tolerance for d in diffs.values())
    if dist.get_rank() == 0:
        if args.json:
            print(json.dumps({"max_abs_diff": diffs, "tolerance": args.tolerance, "ok": ok}))
        else:
            for name, d in diffs.items():
                print(f"{name:12s} max |logit diff| = {d:.3e}")
            print(f"{'PASS' if ok else 'FAIL'}: max {max(diffs.values()):.3e} vs tolerance {args.tolerance:g} "
                  f"(tp={args.tp}, pp={args.pp})")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if ok else 1
