"""Benchmark of the HF <-> Megatron checkpoint converter against a safetensors read+write baseline.

    python bench/convert.py [--gib 1.2] [--repeats 2] [--tp 2] [--threads N] [--workdir DIR] [--keep]

What it does (all on this machine, same disk, same process layout):
1. builds a synthetic Qwen2.5-VL-shaped HF checkpoint (bf16, random values, hub key scheme, shards +
   model.safetensors.index.json) of about --gib GiB: text hidden 2048, 16 heads / 2 KV heads
   (head_dim 128), ffn 5504, vocab 32000, as many LM layers as it takes to reach the size; vision
   depth 4, hidden 1280, 16 heads, intermediate 3420 (the real 7B vision width: 3420 -> 3456 padding);
   written shard by shard with `safetensors.torch.save_file`, so the builder holds one shard at a time;
2. times, --repeats times each (interleaved; best is reported):
     baseline   every tensor read with `safe_open(...).get_tensor` and written back with
                `safetensors.torch.save_file` into another folder, shard by shard, then fsync
                ("safetensors read+write of the same bytes": the physical-limit reference; with
                safetensors >= 0.8 get_tensor is mmap-backed, like the converter's reader)
     cp         plain file copy + fsync of the shards (pure I/O, for reference only)
     hf->mcore  `hf_to_mcore(tp=--tp, pp=1, progress=False)` (the converter fsyncs its output)
     mcore->hf  `mcore_to_hf(progress=False)` of that output (fsyncs too)
   Every measurement reads files that were written moments before (warm page cache: dropping the
   cache needs root), writes into a fresh folder and ends after fsync; `os.sync()` runs before each
   measurement so earlier phases' dirty pages are not flushed during it. Times are wall-clock of the
   whole call (header parsing, planning and commit included). All runs are printed besides the best:
   on a small shared VM the spread is large. --threads sets OMP_NUM_THREADS for the phases (torch's
   intra-op threads; default unset = one per core).
3. peak memory: every phase runs in its own subprocess (`--phase X`); a thread samples RssAnon from
   /proc/self/status every 10 ms. Reported: peak RssAnon minus RssAnon right before the phase
   (after imports), i.e. the heap the phase needed. File-backed pages (the converter mmaps its
   input; the page cache) are not anonymous memory and are reclaimable, so they are not counted
   there; the peak total RSS including mapped file pages (VmHWM) is printed alongside.
4. verifies the round trip: every tensor of the exported HF folder equals the input bit for bit
   (streamed, one tensor at a time), same names (hub scheme), dtypes, shapes, config.json: PASS/FAIL.

Profile a single phase with e.g.
    python bench/convert.py --gib 1.2 --keep --workdir /tmp/cb   (once, to leave the files there)
    python -m cProfile -s cumtime bench/convert.py --phase hf2mcore --src /tmp/cb/hf_in --dst /tmp/cb/x
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GIB = 2**30
MIB = 2**20
INDEX = "model.safetensors.index.json"

# --------------------------------------------------------------------------------------------
# Synthetic checkpoint
# --------------------------------------------------------------------------------------------

TEXT = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, intermediate_size=5504, vocab_size=32000)
VISION = dict(depth=4, hidden_size=1280, num_heads=16, intermediate_size=3420)


def make_config(num_layers: int) -> dict:
    """A transformers-5 style Qwen2.5-VL config.json (the tiny model's structure, bigger numbers)."""
    vocab = TEXT["vocab_size"]
    ids = {n: vocab - 15 + i for i, n in enumerate(
        ("bos", "eos", "vision_start", "vision_end", "image", "video"))}  # inside the vocabulary
    text = {
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "hidden_act": "silu",
        "hidden_size": TEXT["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": TEXT["intermediate_size"],
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 32768,
        "max_window_layers": num_layers,
        "model_type": "qwen2_5_vl_text",
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": num_layers,
        "num_key_value_heads": TEXT["num_key_value_heads"],
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        # sum = head_dim / 2 = 64 (head_dim = 2048 / 16 = 128), as in the 7B
        "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }
    vision = {
        "depth": VISION["depth"],
        "fullatt_block_indexes": [VISION["depth"] - 1],
        "hidden_act": "silu",
        "hidden_size": VISION["hidden_size"],
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": VISION["intermediate_size"],
        "model_type": "qwen2_5_vl_vision",
        "num_heads": VISION["num_heads"],
        "out_hidden_size": TEXT["hidden_size"],
        "patch_size": 14,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "dtype": "bfloat16",
        "image_token_id": ids["image"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": "5.19.0",
        "video_token_id": ids["video"],
        "vision_config": vision,
        "vision_end_token_id": ids["vision_end"],
        "vision_start_token_id": ids["vision_start"],
    }


def _hub_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from checkpoints_conv.convert import to_scheme
    from checkpoints_conv.mapping import expected_hf_shapes
    from megatron_vr1.config import load_hf_arch

    return {to_scheme(n, "hub"): s for n, s in expected_hf_shapes(load_hf_arch(folder)).items()}


def write_synthetic_weights(dst: Path, config_for_layers, target_bytes: int, shard_mib: int, dtype: torch.dtype,
                            init, min_shards: int = 1) -> dict:
    """Fewest LM layers whose weights reach `target_bytes`, written as random safetensors shards of
    about `shard_mib` each plus an index. `config_for_layers(n)` gives config.json for n layers;
    `init(name, empty_tensor)` fills a tensor. Also used by bench/resync.py."""
    from safetensors.torch import save_file

    def nbytes(shape) -> int:
        return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    layers = 1
    while True:  # fewest LM layers that reach the target size
        (dst / "config.json").write_text(json.dumps(config_for_layers(layers), indent=2) + "\n")
        shapes = _hub_shapes(dst)
        total = sum(nbytes(s) for s in shapes.values())
        if total >= target_bytes:
            break
        layers += 1
    shards, cur, cur_bytes = [], [], 0
    for name, shape in shapes.items():
        if cur and cur_bytes + nbytes(shape) > shard_mib * MIB:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes(shape)
    shards.append(cur)
    if len(shards) < min_shards:
        raise SystemExit(f"--shard-mib {shard_mib} gives {len(shards)} shard(s) for {total / GIB:.2f} GiB; use a smaller one")
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: init(n, torch.empty(shapes[n], dtype=dtype)) for n in names}
        save_file(tensors, dst / fname, metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n in names})
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return dict(bytes=total, tensors=len(shapes), shards=len(shards), lm_layers=layers)


def phase_build(dst: Path, gib: float, shard_mib: int, seed: int) -> dict:
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    return write_synthetic_weights(dst, make_config, int(gib * GIB), shard_mib, torch.bfloat16,
                                   lambda name, t: t.normal_(0.0, 0.02, generator=gen), min_shards=2)


# --------------------------------------------------------------------------------------------
# Measured phases
# --------------------------------------------------------------------------------------------


def _shard_files(folder: Path) -> list[str]:
    if (folder / INDEX).exists():
        return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    return ["model.safetensors"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def phase_baseline(src: Path, dst: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    n = 0
    for f in _shard_files(src):
        with safe_open(src / f, framework="pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        save_file(tensors, dst / f, metadata={"format": "pt"})
        _fsync(dst / f)
        n += len(tensors)
        del tensors
    if (src / INDEX).exists():
        shutil.copy2(src / INDEX, dst / INDEX)
    return dict(tensors=n)


def phase_copy(src: Path, dst: Path) -> dict:
    dst.mkdir(parents=True)
    for f in _shard_files(src):
        shutil.copyfile(src / f, dst / f)
        _fsync(dst / f)
    return {}


def phase_hf2mcore(src: Path, dst: Path, tp: int) -> dict:
    from checkpoints_conv.convert import hf_to_mcore

    s = hf_to_mcore(src, dst, tp=tp, pp=1, progress=False)
    return dict(tensors=s.tensors, written_bytes=s.bytes, inner_seconds=s.seconds,
                disk_bytes=sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()))


def phase_mcore2hf(src: Path, dst: Path) -> dict:
    from checkpoints_conv.convert import mcore_to_hf

    s = mcore_to_hf(src, dst, progress=False)
    return dict(tensors=s.tensors, written_bytes=s.bytes, inner_seconds=s.seconds)


def phase_verify(src: Path, dst: Path) -> dict:
    """src: the built HF folder, dst: the exported one. Streams one tensor pair at a time."""
    from safetensors import safe_open

    def where(folder):
        out = {}
        for f in _shard_files(folder):
            with safe_open(folder / f, framework="pt") as sf:
                out.update({k: f for k in sf.keys()})
        return out

    a_map, b_map = where(src), where(dst)
    problems = []
    if set(a_map) != set(b_map):
        problems.append(f"names differ: missing {sorted(set(a_map) - set(b_map))[:5]}, "
                        f"extra {sorted(set(b_map) - set(a_map))[:5]}")
    handles = {}
    checked = nbytes = 0
    try:
        for f in _shard_files(src):
            with safe_open(src / f, framework="pt") as sa:
                for k in sa.keys():
                    if k not in b_map:
                        continue
                    bf = b_map[k]
                    if bf not in handles:
                        handles[bf] = safe_open(dst / bf, framework="pt").__enter__()
                    a, b = sa.get_tensor(k), handles[bf].get_tensor(k)
                    if a.dtype != b.dtype or a.shape != b.shape:
                        problems.append(f"{k}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
                    elif not torch.equal(a.view(torch.int16), b.view(torch.int16)):
                        problems.append(f"{k}: values differ")
                    checked += 1
                    nbytes += a.numel() * a.element_size()
                    del a, b
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    if json.loads((src / "config.json").read_text()) != json.loads((dst / "config.json").read_text()):
        problems.append("config.json differs")
    return dict(ok=not problems and checked == len(a_map), checked=checked, bytes=nbytes, problems=problems[:10])


# --------------------------------------------------------------------------------------------
# Memory sampling (inside each phase's subprocess)
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonSampler:
    """Peak RssAnon of this process, sampled every `period` seconds by a daemon thread."""

    def __init__(self, period: float = 0.01):
        self.period, self.peak, self._stop = period, _status_kib("RssAnon"), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))


def run_phase(args) -> None:
    src, dst = Path(args.src) if args.src else None, Path(args.dst)
    # import everything a phase needs before the "before" reading, so imports are not counted
    import safetensors.torch  # noqa: F401
    from checkpoints_conv import convert  # noqa: F401

    base_anon, base_rss = _status_kib("RssAnon"), _status_kib("VmRSS")
    with AnonSampler() as mem:
        t0 = time.perf_counter()
        if args.phase == "build":
            extra = phase_build(dst, args.gib, args.shard_mib, args.seed)
        elif args.phase == "baseline":
            extra = phase_baseline(src, dst)
        elif args.phase == "cp":
            extra = phase_copy(src, dst)
        elif args.phase == "hf2mcore":
            extra = phase_hf2mcore(src, dst, args.tp)
        elif args.phase == "mcore2hf":
            extra = phase_mcore2hf(src, dst)
        elif args.phase == "verify":
            extra = phase_verify(src, dst)
        else:
            raise SystemExit(f"unknown --phase {args.phase}")
        seconds = time.perf_counter() - t0
    res = dict(phase=args.phase, seconds=seconds, base_anon=base_anon * 1024, peak_anon=mem.peak * 1024,
               anon_delta=(mem.peak - base_anon) * 1024, base_rss=base_rss * 1024,
               vm_hwm=_status_kib("VmHWM") * 1024,
               ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra)
    if args.result:
        Path(args.result).write_text(json.dumps(res))
    else:
        print(json.dumps(res))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _child(phase: str, work: Path, src: Path | None, dst: Path, args, **kw) -> dict:
    result = work / f".result-{phase}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--dst", str(dst), "--result", str(result),
           "--tp", str(args.tp), "--gib", str(args.gib), "--shard-mib", str(args.shard_mib), "--seed", str(args.seed)]
    if src is not None:
        cmd += ["--src", str(src)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    os.sync()  # earlier phases' dirty pages are flushed before, not during, a measurement
    subprocess.run(cmd, check=True, env=env)
    out = json.loads(result.read_text())
    result.unlink()
    return out


def make_workdir(workdir: str | None, prefix: str) -> Path:
    """--workdir (created; must be empty), or a fresh folder under /tmp named `prefix`..."""
    if not workdir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"--workdir {work} is not empty")
    return work


def _rm(p: Path) -> None:
    if p.exists():
        shutil.rmtree(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.2, help="size of the synthetic checkpoint (GiB, bf16)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement; the best is reported")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size recorded by hf_to_mcore")
    ap.add_argument("--shard-mib", type=int, default=256, help="max shard size of the synthetic HF checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for all files (default: a fresh temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (default: deleted at the end)")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for the phases (default: unset, i.e. torch's default = #cores)")
    ap.add_argument("--no-cp", action="store_true", help="skip the plain file-copy reference")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return run_phase(args)

    work = make_workdir(args.workdir, "convert-bench-")
    hf_in, base_out, cp_out = work / "hf_in", work / "baseline_out", work / "cp_out"
    mcore, hf_out = work / "mcore", work / "hf_out"
    t_start = time.perf_counter()
    try:
        threads = args.threads or torch.get_num_threads()
        print(f"workdir {work}; torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {threads}"
              f"{'' if args.threads else ' (default)'}", flush=True)
        build = _child("build", work, None, hf_in, args)
        model_bytes = build["bytes"]
        print(f"built {model_bytes / GIB:.3f} GiB ({model_bytes / 1e9:.3f} GB) bf16: {build['tensors']} tensors in "
              f"{build['shards']} shards, {build['lm_layers']} LM layers + {VISION['depth']} vision blocks, "
              f"in {build['seconds']:.1f} s (builder peak anon +{build['anon_delta'] / MIB:.0f} MiB)", flush=True)

        runs: dict[str, list[dict]] = {k: [] for k in ("baseline", "cp", "hf2mcore", "mcore2hf")}
        for r in range(args.repeats):
            for phase, src, dst in (("baseline", hf_in, base_out), ("cp", hf_in, cp_out),
                                    ("hf2mcore", hf_in, mcore), ("mcore2hf", mcore, hf_out)):
                if phase == "cp" and args.no_cp:
                    continue
                _rm(dst)
                res = _child(phase, work, src, dst, args)
                runs[phase].append(res)
                print(f"  run {r + 1}/{args.repeats} {phase:9s} {res['seconds']:7.2f} s   "
                      f"peak anon +{res['anon_delta'] / MIB:6.0f} MiB", flush=True)
                if phase in ("baseline", "cp"):
                    _rm(dst)  # keep the page cache for the files that are measured next
        verify = _child("verify", work, hf_in, hf_out, args)

        best = {k: min(v, key=lambda x: x["seconds"]) for k, v in runs.items() if v}
        peak = {k: max(v, key=lambda x: x["anon_delta"]) for k, v in runs.items() if v}
        hwm = {k: max(x["vm_hwm"] - x["base_rss"] for x in v) for k, v in runs.items() if v}
        base_gbps = model_bytes / 1e9 / best["baseline"]["seconds"]
        labels = {"baseline": "safetensors read+write", "cp": "file copy (reference)",
                  "hf2mcore": f"hf->mcore (tp={args.tp})", "mcore2hf": "mcore->hf"}
        print()
        print(f"model: {model_bytes / 1e9:.3f} GB = {model_bytes / GIB:.3f} GiB bf16; best of {args.repeats}; "
              f"warm page cache (inputs written just before); every row ends with fsync; "
              f"GB/s = model bytes / wall s")
        hdr = (f"{'phase':24s} {'bytes':>13s} {'seconds':>8s} {'GB/s':>6s} {'ratio':>6s} "
               f"{'peak anon':>10s} {'% model':>8s} {'peak RSS+file':>14s}  all runs (s)")
        print(hdr)
        print("-" * len(hdr))
        for k in ("baseline", "cp", "hf2mcore", "mcore2hf"):
            if k not in best:
                continue
            s = best[k]["seconds"]
            all_runs = " ".join(f"{x['seconds']:.2f}" for x in runs[k])
            gbps = model_bytes / 1e9 / s
            print(f"{labels[k]:24s} {model_bytes:13,d} {s:8.2f} {gbps:6.3f} {gbps / base_gbps:6.2f} "
                  f"{peak[k]['anon_delta'] / MIB:7.0f} MiB {100 * peak[k]['anon_delta'] / model_bytes:7.1f}% "
                  f"{hwm[k] / MIB:10.0f} MiB  {all_runs}")
        print("-" * len(hdr))
        print("ratio = GB/s / safetensors read+write GB/s; peak anon = max RssAnon (10 ms samples) minus RssAnon "
              "before the phase (after imports, ~{:.0f} MiB); peak RSS+file = VmHWM - VmRSS before, incl. "
              "mmapped file pages".format(best["hf2mcore"]["base_anon"] / MIB))
        h2m, m2h = best["hf2mcore"], best["mcore2hf"]
        print(f"hf->mcore wrote {h2m['written_bytes']:,d} tensor bytes (with vision-MLP padding 3420->3456), "
              f"{h2m['disk_bytes']:,d} bytes on disk; converter-internal seconds: "
              f"hf->mcore {h2m['inner_seconds']:.2f}, mcore->hf {m2h['inner_seconds']:.2f}")
        status = "PASS" if verify["ok"] else "FAIL"
        why = "" if verify["ok"] else ": " + "; ".join(verify["problems"])
        print(f"round trip hf->mcore->hf: {status} ({verify['checked']} tensors, {verify['bytes']:,d} bytes "
              f"compared bit for bit in {verify['seconds']:.1f} s){why}")
        g1, g2 = model_bytes / 1e9 / h2m["seconds"], model_bytes / 1e9 / m2h["seconds"]
        print(f"SUMMARY {model_bytes / GIB:.2f} GiB bf16: baseline {base_gbps:.2f} GB/s | "
              f"hf->mcore {g1:.2f} GB/s ({g1 / base_gbps:.2f}x) peak +{peak['hf2mcore']['anon_delta'] / MIB:.0f} MiB | "
              f"mcore->hf {g2:.2f} GB/s ({g2 / base_gbps:.2f}x) peak +{peak['mcore2hf']['anon_delta'] / MIB:.0f} MiB | "
              f"round trip {status} | total {time.perf_counter() - t_start:.0f} s")
        if not verify["ok"]:
            sys.exit(1)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
