"""Benchmark of the weight resync (Megatron model -> vLLM engine) against an in-memory copy of the same bytes.

    python bench/resync.py [--mb 600] [--bucket-mb 64 256] [--repeats 3] [--no-profile] [--workdir DIR] [--keep]
    torchrun --standalone --nproc-per-node 2 bench/resync.py --tp 2 [same options]   (the TP2 case, below)

(50-85 s at the default size on 2 shared vCPUs; --mb 1500 gives 22 LM layers and takes about 2 min)

What it does (one process, like the trainer: gloo world size 1, TP=PP=1, vLLM in-process):
1. builds a synthetic Qwen2.5-VL-shaped HF checkpoint of about --mb MB in float32 (vLLM on CPU
   runs fp32): the tiny model's config.json structure and its tokenizer / processor / chat
   template (so vLLM and transformers load it), with text hidden 1024, 8 heads / 2 KV heads
   (head_dim 128), ffn 2816, vocab 32000 (> the tokenizer's 320: padding rows), as many LM layers
   as it takes to reach the size; vision depth 2, hidden 1280, 16 heads, intermediate 3420 (the
   7B's width, padded to 3456 in Megatron), out_hidden 1024. Random N(0, 0.02) values, norms = 1.
   The HF shape table (`_hub_shapes`) and the RssAnon sampler come from bench/convert.py; then `hf_to_mcore`.
2. starts `VLLMEngine` (max_model_len 256, 32 MiB KV cache), builds the Megatron model and loads
   the converted checkpoint, then times, --repeats times each (interleaved; best and all runs):
     memcpy          `dst.copy_(src)` of every model parameter into preallocated tensors of the
                     same shapes: the physical limit on this machine (same process, same threads)
     hf_buckets B    `hf_buckets(model, arch, bucket_bytes=B)` drained, nothing kept (gather + unpack)
     update only B   `engine.update_weights(buckets)` of buckets built beforehand (the engine side)
     resync B        `engine.update_weights(hf_buckets(model, arch, bucket_bytes=B))` (what the trainer runs)
   for every B in --bucket-mb. GB/s = bytes / wall s (memcpy: the Megatron parameters' bytes;
   the others: the HF tensors' bytes, i.e. without the Megatron vocab / vision-MLP padding).
   Peak extra memory: RssAnon sampled every 10 ms by a thread, minus RssAnon right before the
   run (after `malloc_trim`); for "update only" the prebuilt buckets are already counted before.
   The progress lines also print what is still held after the run (+ malloc_trim): 0 = no leak.
3. checks once: the engine's greedy output for a short text prompt after the resyncs equals its
   output before (same weights), and every `update_weights` returned the expected tensor count.
4. prints the table and a SUMMARY line; if a resync is below 0.2x of memcpy (--profile-below),
   profiles one resync per bucket size with cProfile and prints where the time goes (the .prof
   files stay in the workdir with --keep, next to vllm.log), times the engine's non-finite check
   against allocation-free alternatives, and re-times the resync with proposed changes applied as
   bench-only monkeypatches (interleaved with the unpatched resync; the repo is not changed).

vLLM's CPU worker replaces `torch.set_num_threads` with a no-op once it has bound its threads,
so the thread count in effect for every phase is the one vLLM leaves (printed).

TP2 case (--tp 2, under torchrun with 2 ranks): both ranks form the trainer at tensor parallel 2
(gloo world of 2, `initialize_model_parallel(tensor_model_parallel_size=2)`, the Megatron model built
with ModelOptions(tp=2) and loaded from the same TP1-converted checkpoint, i.e. resharded on load)
and ONE `VLLMEngine(..., tensor_parallel_size=2)` spanning both ranks (vLLM's external_launcher,
one engine shard per rank). Rank 0 builds and converts the checkpoint (the sizes above already
divide by 2 where vLLM splits: 8 heads, 2 KV heads, ffn 2816, vision 16 heads / MLP 3420 / merger
5120, vocab 32000; `check_rollout_tp` is run to be sure). The resync is the RL loop's TP2 path
(`rl.loop.resync`): every rank runs `engine.update_weights(hf_buckets(model, arch, ...))`, i.e.
`hf_buckets` gathers the TP shards into full HF tensors on every rank (collectives) and each rank's
vLLM worker takes its shard's slice. Every rank times the same phases (a barrier right before each
timed run, so both ranks run the phase at the same time, as they do in the trainer); memcpy is of
this rank's own parameter shards (about half the model), while the hf_buckets / update / resync
bytes are the full HF tensors that every rank builds and hands to its engine shard, so the ratio
compares full-model bytes per second with shard-copy bytes per second. Rank 0 prints one table with
a row per phase and rank, and the SUMMARY. The greedy check runs the same prompt on both ranks
(the engine's ranks make the same calls) and must hold on both. The profiler / what-if part is not
run at TP2 (its patches assume TP1).
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import ctypes
import gc
import json
import logging
import os
import pstats
import shutil
import socket
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import convert as bench_convert  # noqa: E402  (bench/convert.py: shape table, AnonSampler)

MIB = 2**20
INDEX = bench_convert.INDEX

TEXT = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, intermediate_size=2816, vocab_size=32000)
VISION = dict(depth=2, hidden_size=1280, num_heads=16, intermediate_size=3420)
PROMPT = "<|im_start|>user\nHow many red shapes are there?<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------
# Synthetic checkpoint (float32)
# --------------------------------------------------------------------------------------------


def make_config(template: dict, num_layers: int) -> dict:
    """The tiny model's config.json (token ids, rope types, every field) with bigger sizes."""
    cfg = json.loads(json.dumps(template))
    t, v = cfg["text_config"], cfg["vision_config"]
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    t.update(hidden_size=TEXT["hidden_size"], num_attention_heads=TEXT["num_attention_heads"],
             num_key_value_heads=TEXT["num_key_value_heads"], intermediate_size=TEXT["intermediate_size"],
             vocab_size=TEXT["vocab_size"], num_hidden_layers=num_layers, max_window_layers=num_layers,
             layer_types=["full_attention"] * num_layers)
    t["rope_parameters"]["mrope_section"] = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # [16, 24, 24]
    v.update(depth=VISION["depth"], hidden_size=VISION["hidden_size"], num_heads=VISION["num_heads"],
             intermediate_size=VISION["intermediate_size"], out_hidden_size=TEXT["hidden_size"],
             fullatt_block_indexes=[VISION["depth"] - 1])
    cfg["dtype"] = "float32"
    return cfg


def build_checkpoint(dst: Path, mb: float, shard_mib: int, seed: int) -> dict:
    from megatron_vr1.tiny_model import build_tiny_model

    tiny = dst.parent / "tiny"
    build_tiny_model(tiny)
    dst.mkdir(parents=True)
    for f in tiny.iterdir():  # tokenizer, processor, chat template, generation config
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", INDEX):
            shutil.copy2(f, dst / f.name)
    template = json.loads((tiny / "config.json").read_text())
    shutil.rmtree(tiny)

    gen = torch.Generator().manual_seed(seed)
    norms = ("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")

    def init(name, t):
        return t.fill_(1.0) if name.endswith(norms) else t.normal_(0.0, 0.02, generator=gen)

    return bench_convert.write_synthetic_weights(dst, lambda layers: make_config(template, layers), int(mb * 1e6),
                                                 shard_mib, torch.float32, init)


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL("libc.so.6")


def _trim() -> None:
    gc.collect()
    _LIBC.malloc_trim(0)


_BARRIER = None  # TP2: dist.barrier, so every rank starts a timed run together (None at TP1)


def measure(fn) -> dict:
    """Wall seconds and peak extra RssAnon of fn()."""
    _trim()
    before = bench_convert._status_kib("RssAnon")
    if _BARRIER is not None:
        _BARRIER()
    with bench_convert.AnonSampler(0.01) as mem:
        t0 = time.perf_counter()
        extra = fn()
        seconds = time.perf_counter() - t0
    extra = {("inner_" + k if k in ("seconds", "peak") else k): v for k, v in (extra or {}).items()}
    _trim()
    kept = bench_convert._status_kib("RssAnon") - before  # still held after the run (+ malloc_trim)
    return dict(seconds=seconds, peak=(mem.peak - before) * 1024, kept=kept * 1024, **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# cProfile entries to report: (label, file path fragment, function name)
PROFILE_ROWS = [
    ("resync total (update_weights)", "rollout/vllm_engine.py", "update_weights"),
    ("  hf_buckets (generator, all resumptions)", "rollout/resync.py", "hf_buckets"),
    ("    _local_pieces (sharded_state_dict)", "rollout/resync.py", "_local_pieces"),
    ("    _assemble (empty + copy of each full tensor)", "rollout/resync.py", "_assemble"),
    ("    mapping.unpack (empty + copy per HF tensor, padding check)", "checkpoints_conv/mapping.py", "unpack"),
    ("  _validate (isfinite of every tensor)", "rollout/vllm_engine.py", "_validate"),
    ("  vLLM reload_weights (per bucket)", "reload/inplace.py", "reload_weights"),
    ("    initialize_layerwise_reload (every module, every call)", "reload/layerwise.py", "initialize_layerwise_reload"),
    ("    model.load_weights (buffer + process)", "qwen2_5_vl.py", "load_weights"),
    ("      _layerwise_process (materialize, load, repack, copy back)", "reload/layerwise.py", "_layerwise_process"),
    ("        materialize_layer (allocate fresh params)", "reload/meta.py", "materialize_layer"),
    ("        process_weights_after_loading (CPU GEMM repacking)", "layers/linear.py", "process_weights_after_loading"),
    ("          dispatch_cpu_unquantized_gemm", "layers/utils.py", "dispatch_cpu_unquantized_gemm"),
    ("        _copy_and_restore_kernel_tensors (copy back)", "reload/layerwise.py", "_copy_and_restore_kernel_tensors"),
    ("    finalize_layerwise_reload (every module, every call)", "reload/layerwise.py", "finalize_layerwise_reload"),
    ("    logging (vLLM warnings/info, all callers)", "logging/__init__.py", "_log"),
    ("  reset_prefix_cache", "entrypoints/llm.py", "reset_prefix_cache"),
    ("  reset_encoder_cache", "", "reset_encoder_cache"),
    ("torch function mode (platform.cpu_device_mode)", "megatron_vr1/platform.py", "__torch_function__"),
    ("Tensor.copy_ (all callers)", "", "method 'copy_' of 'torch._C.TensorBase' objects"),
    ("torch.empty (all callers)", "", "built-in method empty of type object"),
    ("isfinite (all callers)", "", "built-in method isfinite of type object"),
    ("count_nonzero (all callers)", "", "built-in method count_nonzero of type object"),
    ("create_onednn_mm (oneDNN handle per linear)", "_custom_ops.py", "create_onednn_mm"),
]


def validation_alternatives(model, arch) -> list[str]:
    """Seconds to check every HF tensor of a resync for non-finite values, current way vs exact
    allocation-free alternatives (torch.aminmax propagates NaN and +-inf)."""
    from megatron_vr1.rollout.resync import hf_buckets

    tensors = [t for b in hf_buckets(model, arch, bucket_bytes=1 << 40) for _, t in b]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    ways = {
        "torch.isfinite(t).all() (now)": lambda t: bool(torch.isfinite(t).all()),
        "torch.aminmax(t) -> isfinite(min), isfinite(max)": lambda t: all(bool(torch.isfinite(x)) for x in torch.aminmax(t)),
        "torch.isfinite(t.sum()) (fast path; exact re-check if not finite)": lambda t: bool(torch.isfinite(t.sum())),
    }
    out = [f"non-finite check of all {len(tensors)} HF tensors ({nbytes / 1e6:.0f} MB), best of 3:"]
    for label, fn in ways.items():
        best = float("inf")
        for _ in range(3):
            _trim()
            t0 = time.perf_counter()
            assert all(fn(t) for t in tensors)
            best = min(best, time.perf_counter() - t0)
        out.append(f"    {label:66s} {best:6.3f} s  {nbytes / 1e9 / best:6.2f} GB/s")
    del tensors
    return out


def what_if(engine, model, arch, bucket_mbs: list[int], repeats: int) -> list[str]:
    """Best-of-`repeats` resync with two of the proposed changes applied as bench-only patches
    (the repo's code is not changed): (1) the non-finite check via torch.aminmax, (2) plus no
    gather copy at TP=1 (`_assemble` returns the local tensor when it is already the whole one),
    (3) plus megatron_vr1.platform's global TorchFunctionMode popped around the resync."""
    from megatron_vr1.rollout import resync as rs
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    orig_validate, orig_assemble = VLLMEngine._validate, rs._assemble

    def validate_aminmax(self, bucket):
        for name, t in bucket:
            shape = self.hf_shapes.get(name)
            if shape is None or tuple(t.shape) != tuple(shape):
                return orig_validate(self, bucket)  # raises the usual error
            lo, hi = torch.aminmax(t)  # one pass, no temporaries; NaN and +-inf propagate
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                raise ValueError(f"resync bucket: {name} has non-finite values")

    def assemble_no_copy(p, local, topo, dtype):
        if topo.tp_size == 1 and len(local) == 1:
            off, data = local[0]
            if not any(off) and tuple(data.shape) == tuple(p.shape) and data.dtype == dtype:
                return data
        return orig_assemble(p, local, topo, dtype)

    variants = [("as is (baseline, interleaved)", False, False, False),
                ("validate via torch.aminmax", True, False, False),
                ("  + no gather copy at TP=1", True, True, False),
                ("  + platform TorchFunctionMode off", True, True, True)]
    runs = {(v[0], mb): [] for v in variants for mb in bucket_mbs}
    try:
        for _ in range(repeats):
            for mb in bucket_mbs:
                for label, v, a, nomode in variants:
                    VLLMEngine._validate = validate_aminmax if v else orig_validate
                    rs._assemble = assemble_no_copy if a else orig_assemble

                    def go():
                        with (torch.overrides._pop_mode_temporarily() if nomode else contextlib.nullcontext()):
                            return vars(engine.update_weights(rs.hf_buckets(model, arch, bucket_bytes=mb * MIB)))
                    runs[(label, mb)].append(measure(go))
    finally:
        VLLMEngine._validate, rs._assemble = orig_validate, orig_assemble
    out = [f"what-if (bench-only patches of proposed changes; interleaved with the unpatched resync), best of {repeats}:"]
    for mb in bucket_mbs:
        for label, *_ in variants:
            rr = runs[(label, mb)]
            b = min(rr, key=lambda x: x["seconds"])
            assert b["tensors"] == len(engine.hf_shapes)
            peak = max(x["peak"] for x in rr)
            all_runs = " ".join(f"{x['seconds']:.3f}" for x in rr)
            out.append(f"    {label:36s} {mb:4d} MiB  {b['seconds']:6.3f} s  {b['bytes'] / 1e9 / b['seconds']:5.2f} GB/s"
                       f"  peak +{peak / MIB:4.0f} MiB  runs {all_runs}")
    return out


def profile_resync(engine, model, arch, bucket_bytes: int, top: int, log_path: Path) -> tuple[float, list[str]]:
    from megatron_vr1.rollout.resync import hf_buckets

    _trim()
    log_lines = len(log_path.read_text().splitlines())
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    engine.update_weights(hf_buckets(model, arch, bucket_bytes=bucket_bytes))
    prof.disable()
    wall = time.perf_counter() - t0
    for h in logging.getLogger("vllm").handlers:
        h.flush()
    log_lines = len(log_path.read_text().splitlines()) - log_lines
    prof.dump_stats(str(log_path.parent / f"resync-{bucket_bytes // MIB}MiB.prof"))
    st = pstats.Stats(prof)
    total = max((v[3] for (f, _, n), v in st.stats.items() if n == "update_weights" and "vllm_engine" in f),
                default=wall)
    lines = [f"cProfile of one resync, bucket {bucket_bytes // MIB} MiB: {wall:.2f} s wall under the profiler; "
             f"vLLM logged {log_lines} lines during it"]
    lines.append(f"    {'where':66s} {'calls':>7s} {'cum s':>7s} {'% resync':>8s} {'own s':>7s}")
    for label, frag, name in PROFILE_ROWS:
        # same-named entries are nested wrappers (e.g. the VL model's and the tower's load_weights):
        # the outermost one's cumulative time, every entry's calls and own time
        calls = cum = own = 0.0
        found = False
        for (f, _, n), (cc, nc, tt, ct, callers) in st.stats.items():
            if n == name and frag in f:
                found = True
                calls, cum, own = calls + nc, max(cum, ct), own + tt
        if found:
            lines.append(f"    {label:66s} {int(calls):7d} {cum:7.2f} {100 * cum / total:7.1f}% {own:7.2f}")
    lines.append(f"    top {top} functions by own time (tottime):")
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (f, ln, n), (cc, nc, tt, ct, callers) in rows:
        where = f"{Path(f).parent.name}/{Path(f).name}:{ln}" if f != "~" else ""
        lines.append(f"      {tt:7.2f} s own {ct:7.2f} s cum {nc:7d} calls  {n[:60]} {where}")
    return wall, lines


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=600, help="size of the synthetic checkpoint (MB = 1e6 bytes, fp32)")
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 256], help="resync bucket sizes (MiB)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; best and all runs are reported")
    ap.add_argument("--shard-mib", type=int, default=256, help="max shard size of the synthetic HF checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-below", type=float, default=0.2,
                    help="profile the resync when its ratio to memcpy is below this (0: never)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--workdir", help="folder for the checkpoints (default: a fresh temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--tp", type=int, default=1, choices=(1, 2),
                    help="2: trainer at TP2 + one vLLM engine of TP2 over both ranks (run under torchrun, 2 ranks)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # engine start-up logs off the table

    import torch.distributed as dist

    global _BARRIER
    tp = args.tp
    rank = 0
    if tp > 1:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != tp:
            raise SystemExit(f"--tp {tp} runs under torchrun with {tp} ranks (WORLD_SIZE {world}): "
                             f"torchrun --standalone --nproc-per-node {tp} bench/resync.py --tp {tp} ...")
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
        rank = dist.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)

    if rank == 0:
        work = bench_convert.make_workdir(args.workdir, "resync-bench-")
    if tp > 1:
        box = [str(work) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        work = Path(box[0])
    hf_dir, mcore_dir = work / "hf", work / "mcore"
    t_start = time.perf_counter()
    engine = None
    try:
        if rank == 0:
            t0 = time.perf_counter()
            info = build_checkpoint(hf_dir, args.mb, args.shard_mib, args.seed)
            t_build = time.perf_counter() - t0
            from checkpoints_conv.convert import hf_to_mcore

            conv = hf_to_mcore(hf_dir, mcore_dir, tp=1, pp=1, progress=False)
            built = [info, t_build, conv.seconds]
        else:
            built = [None, None, None]
        if tp > 1:  # the other ranks wait here for rank 0's checkpoint
            dist.broadcast_object_list(built, src=0)
        info, t_build, conv_seconds = built
        say(f"workdir {work}; torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
        say(f"built {info['bytes'] / 1e6:.0f} MB fp32 ({info['tensors']} tensors, {info['shards']} shards, "
            f"{info['lm_layers']} LM layers of hidden {TEXT['hidden_size']} + {VISION['depth']} vision blocks of "
            f"hidden {VISION['hidden_size']}) in {t_build:.1f} s; hf_to_mcore {conv_seconds:.1f} s", flush=True)

        from megatron.core import parallel_state

        from checkpoints_conv.mapping import expected_hf_shapes
        from megatron_vr1 import platform
        from megatron_vr1.config import load_hf_arch
        from megatron_vr1.models.qwen25_vl.io import load_weights
        from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
        from megatron_vr1.rollout.engine import RolloutPrompt, SamplingSettings
        from megatron_vr1.rollout.engine import UpdateStats
        from megatron_vr1.rollout.resync import hf_buckets
        from megatron_vr1.rollout.vllm_engine import VLLMEngine

        platform.setup()
        threads_before = torch.get_num_threads()
        if tp == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        platform.model_parallel_seed(args.seed)
        arch = load_hf_arch(hf_dir)
        if tp > 1:
            from megatron_vr1.rollout.layout import check_rollout_tp

            check_rollout_tp(arch, tp)  # every size vLLM splits divides by tp (raises, naming it, if not)
            _BARRIER = dist.barrier

        t0 = time.perf_counter()
        engine = VLLMEngine(hf_dir, arch, max_model_len=256, kv_cache_bytes=32 * MIB, tensor_parallel_size=tp)
        t_engine = time.perf_counter() - t0
        # vLLM logs to stdout (configured when the engine starts): into a file, to keep the table
        # readable; the records are still formatted and written, as in the trainer
        vllm_log_path = work / ("vllm.log" if rank == 0 else f"vllm-rank{rank}.log")
        vllm_log = open(vllm_log_path, "w")
        for h in logging.getLogger("vllm").handlers:
            if isinstance(h, logging.StreamHandler):
                h.setStream(vllm_log)
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        model = build_model(arch, ModelOptions(tp=tp))
        load_weights(model, mcore_dir)
        t_model = time.perf_counter() - t0
        if tp > 1:
            pc = engine.llm.llm_engine.vllm_config.parallel_config
            say(f"TP{tp}: trainer tensor parallel {parallel_state.get_tensor_model_parallel_world_size()} "
                f"(gloo world {dist.get_world_size()}); one vLLM engine: tensor_parallel_size "
                f"{pc.tensor_parallel_size}, data_parallel_size {pc.data_parallel_size}, executor "
                f"{pc.distributed_executor_backend}", flush=True)
        say(f"vLLM engine up in {t_engine:.1f} s; Megatron model built + loaded in {t_model:.1f} s; "
              f"torch threads {threads_before} before vLLM, {threads} in effect after "
              f"(vLLM's CPU worker makes torch.set_num_threads a no-op, so its own 'reduce to 1 for serving' does not apply either); OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)

        greedy = SamplingSettings(n=1, max_tokens=16, temperature=0.0)

        def greedy_ids():
            return engine.generate([RolloutPrompt(PROMPT)], greedy)[0][0].response_ids

        before_ids = greedy_ids()
        expected_tensors = len(expected_hf_shapes(arch))
        params = [p.detach() for p in model.parameters()]
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        hf_bytes = sum(torch.Size(s).numel() * 4 for s in expected_hf_shapes(arch).values())

        def run_memcpy():
            dst = [torch.empty_like(p) for p in params]
            for d, s in zip(dst, params):  # touch the pages first: the copy is measured, not page faults
                d.fill_(0)

            def go():
                for d, s in zip(dst, params):
                    d.copy_(s)
            r = measure(go)
            del dst
            return r

        def run_memcpy_fresh():
            def go():
                dst = [torch.empty_like(p) for p in params]
                for d, s in zip(dst, params):
                    d.copy_(s)
                return dict(keep=len(dst))
            return measure(go)

        def run_buckets(b):
            def go():
                st = UpdateStats()
                for bucket in hf_buckets(model, arch, bucket_bytes=b, stats=st):
                    del bucket
                return dict(tensors=st.tensors, bytes=st.bytes, buckets=st.buckets)
            return measure(go)

        def run_update_only(b):
            prebuilt = list(hf_buckets(model, arch, bucket_bytes=b))
            r = measure(lambda: vars(engine.update_weights(prebuilt)))
            del prebuilt
            return r

        def run_resync(b):
            return measure(lambda: vars(engine.update_weights(hf_buckets(model, arch, bucket_bytes=b))))

        phases = [("memcpy", "in-memory copy (limit)", run_memcpy, None),
                  ("memcpy_fresh", "copy into fresh empty_like", run_memcpy_fresh, None)]
        for mb in args.bucket_mb:
            phases.append((f"buckets{mb}", f"hf_buckets only, {mb} MiB", run_buckets, mb * MIB))
        for mb in args.bucket_mb:
            phases.append((f"update{mb}", f"update_weights only, {mb} MiB", run_update_only, mb * MIB))
        for mb in args.bucket_mb:
            phases.append((f"resync{mb}", f"resync, {mb} MiB buckets", run_resync, mb * MIB))
        runs: dict[str, list[dict]] = {k: [] for k, *_ in phases}
        for r in range(args.repeats):
            for key, label, fn, b in phases:
                res = fn() if b is None else fn(b)
                runs[key].append(res)
                say(f"  run {r + 1}/{args.repeats} {label:30s} {res['seconds']:7.2f} s   "
                    f"peak +{res['peak'] / MIB:6.0f} MiB   kept after malloc_trim {res['kept'] / MIB:+5.0f} MiB"
                    + (" (rank 0)" if tp > 1 else ""), flush=True)

        after_ids = greedy_ids()
        counts = [x["tensors"] for k in runs if not k.startswith("memcpy") for x in runs[k]]
        ok_greedy = after_ids == before_ids and len(before_ids) > 0
        ok_count = all(c == expected_tensors for c in counts)

        if tp > 1:
            mine = dict(rank=rank, runs=runs, param_bytes=param_bytes, threads=threads, ok_greedy=ok_greedy,
                        ok_count=ok_count, counts=sorted(set(counts)), before=before_ids, after=after_ids)
            ranks: list = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            ok = all(x["ok_greedy"] and x["ok_count"] and x["before"] == ranks[0]["before"] for x in ranks)
            if rank == 0:
                report_tp(ranks, phases, args, hf_bytes, expected_tensors, ok, t_start)
            dist.barrier()  # every rank is done with the engine and the workdir
            if not ok:
                sys.exit(1)
            return

        best = {k: min(v, key=lambda x: x["seconds"]) for k, v in runs.items()}
        base = param_bytes / 1e9 / best["memcpy"]["seconds"]
        print()
        print(f"model: {hf_bytes / 1e6:.0f} MB of HF tensors fp32 ({expected_tensors} tensors); Megatron parameters "
              f"{param_bytes / 1e6:.0f} MB (vocab / vision-MLP padding); torch threads in effect {threads}; "
              f"best of {args.repeats}; GB/s = bytes / wall s")
        hdr = (f"{'phase':30s} {'bytes':>13s} {'seconds':>8s} {'GB/s':>6s} {'ratio':>6s} {'peak extra':>11s} "
               f"{'buckets':>7s}  all runs (s)")
        print(hdr)
        print("-" * len(hdr))
        summary = {}
        for key, label, _, b in phases:
            s = best[key]["seconds"]
            nbytes = param_bytes if key.startswith("memcpy") else best[key]["bytes"]
            gbps = nbytes / 1e9 / s
            summary[key] = (gbps, gbps / base)
            peak = max(x["peak"] for x in runs[key])
            nb = "" if key.startswith("memcpy") else str(best[key]["buckets"])
            all_runs = " ".join(f"{x['seconds']:.3f}" for x in runs[key])
            print(f"{label:30s} {nbytes:13,d} {s:8.3f} {gbps:6.2f} {gbps / base:6.3f} {peak / MIB:7.0f} MiB "
                  f"{nb:>7s}  {all_runs}")
        print("-" * len(hdr))
        print("ratio = GB/s / in-memory copy GB/s; peak extra = max over runs of (peak RssAnon, 10 ms samples) - "
              "RssAnon before the run; the limit's destination (1x the model) is allocated and touched before it is "
              "timed, 'fresh' allocates it inside (page faults included: what a resync that allocates pays); "
              "'update_weights only' gets buckets built beforehand (their memory is not counted)")
        print(f"sanity: greedy {len(before_ids)} tokens after the resyncs {'==' if ok_greedy else '!='} before "
              f"({before_ids[:8]}...); update_weights tensor counts {sorted(set(counts))} "
              f"(expected {expected_tensors}): {'PASS' if ok_greedy and ok_count else 'FAIL'}", flush=True)

        slow = [mb for mb in args.bucket_mb if summary[f"resync{mb}"][1] < args.profile_below]
        if slow and not args.no_profile:
            print()
            for mb in slow:
                _, lines = profile_resync(engine, model, arch, mb * MIB, args.profile_top, vllm_log_path)
                print("\n".join(lines), flush=True)
            print("\n".join(validation_alternatives(model, arch)), flush=True)
            print("\n".join(what_if(engine, model, arch, args.bucket_mb, max(args.repeats, 3))), flush=True)
            print("after profiling: greedy still equal:", greedy_ids() == before_ids)

        parts = [f"memcpy {base:.2f} GB/s"]
        for mb in args.bucket_mb:
            g, r = summary[f"resync{mb}"]
            peak = max(x["peak"] for x in runs[f"resync{mb}"])
            gb, rb = summary[f"buckets{mb}"]
            parts.append(f"resync@{mb}MiB {g:.2f} GB/s ({r:.3f}x, {best[f'resync{mb}']['seconds']:.2f} s, "
                         f"peak +{peak / MIB:.0f} MiB; hf_buckets alone {gb:.2f} GB/s {rb:.2f}x)")
        print(f"SUMMARY {hf_bytes / 1e6:.0f} MB fp32, {threads} torch threads: " + " | ".join(parts)
              + f" | sanity {'PASS' if ok_greedy and ok_count else 'FAIL'} | total {time.perf_counter() - t_start:.0f} s")
        if not (ok_greedy and ok_count):
            sys.exit(1)
    finally:
        if engine is not None:
            engine.shutdown()  # destroys the default process group: last
        if rank == 0:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)


def report_tp(ranks: list[dict], phases: list, args, hf_bytes: int, expected_tensors: int, ok: bool,
              t_start: float) -> None:
    """Rank 0's table and SUMMARY of the TP>1 case: a row per phase and rank (each rank's ratio is to
    its own memcpy of its parameter shards)."""
    tp = len(ranks)
    for x in ranks:
        x["best"] = {k: min(v, key=lambda y: y["seconds"]) for k, v in x["runs"].items()}
        x["base"] = x["param_bytes"] / 1e9 / x["best"]["memcpy"]["seconds"]
    shards = ", ".join(f"rank {x['rank']} {x['param_bytes'] / 1e6:.0f} MB" for x in ranks)
    threads = "/".join(str(x["threads"]) for x in ranks)
    print()
    print(f"TP{tp} (trainer TP{tp} + one vLLM engine of TP{tp} over ranks 0-{tp - 1}); model: {hf_bytes / 1e6:.0f} MB of "
          f"HF tensors fp32 ({expected_tensors} tensors), every rank builds all of them and feeds them to its engine "
          f"shard; Megatron parameter shards: {shards} (vocab / vision-MLP padding); torch threads in effect "
          f"{threads} per rank; best of {args.repeats}; GB/s = bytes / wall s")
    hdr = (f"{'phase':30s} {'rank':>4s} {'bytes':>13s} {'seconds':>8s} {'GB/s':>6s} {'ratio':>6s} {'peak extra':>11s} "
           f"{'buckets':>7s}  all runs (s)")
    print(hdr)
    print("-" * len(hdr))
    summary = {}
    for key, label, _, b in phases:
        for x in ranks:
            best, runs = x["best"][key], x["runs"][key]
            s = best["seconds"]
            nbytes = x["param_bytes"] if key.startswith("memcpy") else best["bytes"]
            gbps = nbytes / 1e9 / s
            summary[(key, x["rank"])] = (gbps, gbps / x["base"], s)
            peak = max(y["peak"] for y in runs)
            nb = "" if key.startswith("memcpy") else str(best["buckets"])
            all_runs = " ".join(f"{y['seconds']:.3f}" for y in runs)
            print(f"{label:30s} {x['rank']:4d} {nbytes:13,d} {s:8.3f} {gbps:6.2f} {gbps / x['base']:6.3f} "
                  f"{peak / MIB:7.0f} MiB {nb:>7s}  {all_runs}")
    print("-" * len(hdr))
    print("ratio = GB/s / this rank's in-memory copy GB/s; memcpy bytes = this rank's Megatron parameter shards, "
          "the other rows' bytes = the full HF tensors every rank builds (so a ratio of 1 at TP2 would mean moving "
          "the whole model as fast as copying half of it); both ranks start every timed run together (barrier); "
          "peak extra = max over runs of (peak RssAnon, 10 ms samples) - RssAnon before the run, per rank; "
          "'update_weights only' gets buckets built beforehand (their memory is not counted)")
    greedy = "; ".join(f"rank {x['rank']} {len(x['before'])} tokens after {'==' if x['ok_greedy'] else '!='} before"
                       for x in ranks)
    same = all(x["before"] == ranks[0]["before"] for x in ranks)
    counts = sorted({c for x in ranks for c in x["counts"]})
    print(f"sanity: greedy {greedy} ({ranks[0]['before'][:8]}...; ranks {'agree' if same else 'DISAGREE'}); "
          f"update_weights tensor counts {counts} (expected {expected_tensors}): {'PASS' if ok else 'FAIL'}", flush=True)
    if not args.no_profile and any(summary[(f"resync{mb}", x["rank"])][1] < args.profile_below
                                   for mb in args.bucket_mb for x in ranks):
        print("(profiling / what-if below --profile-below: TP1 only, not run at TP>1)")
    parts = ["memcpy " + " ".join(f"r{x['rank']} {x['base']:.2f}" for x in ranks) + " GB/s"]
    for mb in args.bucket_mb:
        per = []
        for x in ranks:
            g, r, s = summary[(f"resync{mb}", x["rank"])]
            gb, rb, _ = summary[(f"buckets{mb}", x["rank"])]
            peak = max(y["peak"] for y in x["runs"][f"resync{mb}"])
            per.append(f"r{x['rank']} {g:.2f} GB/s ({r:.3f}x, {s:.2f} s, peak +{peak / MIB:.0f} MiB; "
                       f"hf_buckets alone {gb:.2f} GB/s {rb:.2f}x)")
        parts.append(f"resync@{mb}MiB " + " ".join(per))
    print(f"SUMMARY TP{tp} {hf_bytes / 1e6:.0f} MB fp32, {threads} torch threads per rank: " + " | ".join(parts)
          + f" | sanity {'PASS' if ok else 'FAIL'} | total {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
