"""One call that checks a GPU machine (or, with --cpu-smoke, this script itself on CPU at toy sizes).

    python bench/gpu_check.py --out gpu_check          # on one H100/H200: ~3-6 minutes
    python bench/gpu_check.py --cpu-smoke --out /tmp/x # CPU, toy sizes (tests/test_gpu_readiness.py)
    python bench/gpu_check.py --prepare-wheels wheels  # download megatron-core for a machine without network

Sections (each caught and recorded; the JSON is written even when one fails; the exit status is 1
when any section that was not skipped failed):
  parity     the tiny Qwen2.5-VL in bf16 with the local megatron-core spec vs transformers, same device
  grpo       one GRPO policy update (rl/update.policy_update) with megatron-core DDP + optimizer
             (distributed optimizer on NCCL at world size 1; gloo and the plain optimizer on CPU)
  mfu        tokens/s and MFU of a 7B-shaped language-model slice, forward + backward in bf16
  resync     GB/s of rollout/resync.hf_buckets into an HF-format tensor dict vs a plain copy
  te_fp8     the same slice with Transformer Engine layers, bf16 and FP8 (only where importable)
  vllm       vLLM generation on the tiny model (only where importable, CUDA only)
Writes OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform as _pyplatform
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Dense bf16 peak (no sparsity), TFLOP/s, by the name torch.cuda.get_device_name gives. H200 has
# H100 SXM's compute (more and faster memory only). PCIe/NVL parts run at lower clocks.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("H800", 989.0), ("H20", 148.0), ("A100", 312.0), ("A800", 312.0)]

SECTIONS = ("parity", "grpo", "mfu", "resync", "te_fp8", "vllm")


class Skip(Exception):
    """A section that cannot run here (recorded as 'skipped: <reason>', not a failure)."""


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


# ---------------------------------------------------------------------------------------------- set-up
def init_single_rank(cuda: bool) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_vr1 import platform

    platform.setup()  # a no-op on CUDA: the shims stay inactive there
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    platform.model_parallel_seed(1234)


def sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def tiny_checkpoints(work: Path) -> tuple[Path, Path]:
    from checkpoints_conv.convert import hf_to_mcore
    from megatron_vr1.tiny_model import build_tiny_model

    hf = build_tiny_model(work / "tiny" / "hf", seed=0, overwrite=True)
    mcore = work / "tiny" / "mcore"
    if not (mcore / "megatron_vr1.json").exists():
        hf_to_mcore(hf, mcore, progress=False)
    return hf, mcore


# ---------------------------------------------------------------------------------------------- sections
def section_parity(ctx) -> dict:
    """bf16 tolerance, justified: a bf16 model cannot match an fp32 one better than bf16 rounding
    allows, and how far that goes depends on the model and the kernels. So the reference is the
    same weights in fp32 (transformers, same device), and our bf16 logits must be no further from
    it than 2x transformers' own bf16 logits are, plus 2^-7 of the largest |logit| (one bf16 ulp
    at that magnitude is 2^-8 of it: two ulps of slack for the different summation orders of the
    local spec and transformers' eager attention). A wrong weight, mask or rotary position is off
    by far more than that."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from checkpoints_conv.arch import load_hf_arch
    from checkpoints_conv.verify import probes
    from megatron_vr1 import platform
    from megatron_vr1.models.qwen25_vl.io import load_weights, make_inputs
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.trainer.core import to_device

    dev = ctx["device"]
    hf_dir, mcore_dir = ctx["tiny_hf"], ctx["tiny_mcore"]
    arch = load_hf_arch(hf_dir)
    model = build_model(arch, ModelOptions(params_dtype=torch.bfloat16, use_te=False), parallel_output=False)
    load_weights(model, mcore_dir)
    model.to(dev).eval()

    def hf_model(dtype):
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype,
                                                                  attn_implementation="eager").to(dev).eval()

    hf32, hf16 = hf_model(torch.float32), hf_model(torch.bfloat16)
    out = {"probes": {}, "local_spec": True, "platform_shims_active": bool(platform._INSTALLED)}
    ok = True
    for p in probes(hf_dir):
        x = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in p.inputs.items()}
        inp = to_device(make_inputs(arch, p.inputs["input_ids"], p.inputs.get("attention_mask"),
                                    p.inputs.get("pixel_values"), p.inputs.get("image_grid_thw")), dev)
        with torch.no_grad():
            ref = hf32(**x).logits.float()
            theirs = hf16(**x).logits.float()
            ours = model(inp)[..., : arch.text.vocab_size].float()
        err_ours = (ours - ref).abs().max().item()
        err_hf = (theirs - ref).abs().max().item()
        tol = 2 * err_hf + 2 ** -7 * ref.abs().max().item()
        out["probes"][p.name] = {"ours_vs_fp32": err_ours, "transformers_bf16_vs_fp32": err_hf,
                                 "ours_vs_transformers_bf16": (ours - theirs).abs().max().item(), "tolerance": tol}
        ok &= err_ours <= tol
    del model, hf32, hf16
    if not ok:
        raise AssertionError(f"bf16 logits beyond tolerance: {out['probes']}")
    return out


def section_grpo(ctx) -> dict:
    import torch

    from checkpoints_conv.arch import load_hf_arch
    from checkpoints_conv.verify import probes
    from megatron_vr1.config import OptimConfig
    from megatron_vr1.models.qwen25_vl.io import load_weights, make_inputs
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.rl.update import LossSettings, PolicyMicroBatch, policy_update
    from megatron_vr1.trainer.core import build_optimizer, to_device, wrap_ddp
    from megatron_vr1.trainer.forward import sequence_logprobs

    dev, cuda = ctx["device"], ctx["cuda"]
    arch = load_hf_arch(ctx["tiny_hf"])
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(arch, ModelOptions(params_dtype=dtype, use_te=False))
    load_weights(model, ctx["tiny_mcore"])
    model.to(dev)
    ps_ = {p.name: p.inputs for p in probes(ctx["tiny_hf"])}
    samples = [ps_["text"], ps_["one_image"]]
    S = max(x["input_ids"].shape[1] for x in samples) + 3
    mbs = []
    for k, x in enumerate(samples):
        n = x["input_ids"].shape[1]
        ids = torch.cat([x["input_ids"], torch.full((1, S - n), 302)], 1)
        am = torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, S - n, dtype=torch.long)], 1)
        inp = to_device(make_inputs(arch, ids, am, x.get("pixel_values"), x.get("image_grid_thw")), dev)
        mask = torch.zeros(1, S - 1, device=dev)
        mask[0, n - 12:n - 1] = 1  # the last 11 real tokens are "the response"
        old = sequence_logprobs(model, arch, inp)
        mbs.append(PolicyMicroBatch(inputs=inp, loss_mask_BT=mask, old_logp_BT=old,
                                    adv_B=torch.tensor([1.0 if k == 0 else -0.5], device=dev),
                                    ref_logp_BT=old.clone(), engine_logp_BT=old.clone()))
    before = [float((mb.old_logp_BT * mb.loss_mask_BT).sum()) for mb in mbs]
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3, weight_decay=0.0))
    sync(cuda)
    t0 = time.perf_counter()
    m = policy_update(ddp, opt, mbs, arch, LossSettings(kl_beta=0.01), global_tokens=float(sum(mb.loss_mask_BT.sum() for mb in mbs)),
                      global_seqs=2.0, seq_length=S)
    sync(cuda)
    seconds = time.perf_counter() - t0
    after = [float((sequence_logprobs(model, arch, mb.inputs) * mb.loss_mask_BT).sum()) for mb in mbs]
    import torch.distributed as dist

    out = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
           "distributed_optimizer": bool(ddp.ddp_config.use_distributed_optimizer), "params_dtype": str(dtype),
           "loss": m.loss, "grad_norm": m.grad_norm, "kl": m.kl, "seconds": seconds,
           "sum_logp_before": before, "sum_logp_after": after}
    del ddp, opt, model
    if not (all(map(lambda v: v == v and abs(v) < float("inf"), [m.loss, m.grad_norm])) and m.grad_norm > 0):
        raise AssertionError(f"non-finite or zero loss/grad norm: {out}")
    if before == after:
        raise AssertionError("the update did not change the policy's logprobs")
    return out


def _slice_arch(ctx, layers: int):
    """A 7B-shaped Qwen2.5-VL language model cut to `layers` layers (vision tower: one block); on
    CPU the tiny model's shapes."""
    from checkpoints_conv.arch import load_hf_arch

    base = load_hf_arch(REPO / "configs" / "arch" / "qwen2.5-vl-7b") if ctx["cuda"] else load_hf_arch(ctx["tiny_hf"])
    text = dataclasses.replace(base.text, num_layers=layers)
    vision = dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,))
    return dataclasses.replace(base, text=text, vision=vision)


def _flops_per_step(arch, tokens: int, seq: int) -> float:
    """Model FLOPs of forward + backward (3x forward): 2 per multiply-add of every weight matrix
    of the language model (attention projections, SwiGLU MLP, output layer) per token, plus causal
    attention (QK^T and AV: 2 x 2 x S x head_dim per head per token, halved by the causal mask)."""
    t = arch.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.ffn_hidden_size
    matmul = t.num_layers * per_layer + t.hidden_size * t.vocab_size
    attn = t.num_layers * 2 * 2 * seq * q * 0.5
    return 3 * tokens * (2 * matmul + attn)


def _time_slice(ctx, arch, opts, seq: int, iters: int, warmup: int) -> dict:
    import torch

    from megatron_vr1.models.qwen25_vl.io import make_inputs
    from megatron_vr1.models.qwen25_vl.model import build_model
    from megatron_vr1.trainer.core import to_device

    dev, cuda = ctx["device"], ctx["cuda"]
    model = build_model(arch, opts).to(dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(arch.text.vocab_size, 150000), (1, seq), generator=g)
    inp = to_device(make_inputs(arch, ids), dev)
    fp8_ctx = None
    if opts.fp8:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Format

        fp8_ctx = lambda: te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID))  # noqa: E731

    def step():
        if fp8_ctx:
            with fp8_ctx():
                out = model(inp)
        else:
            out = model(inp)
        out.float().mean().backward()

    for _ in range(warmup):
        step()
    sync(cuda)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(cuda)
    dt = (time.perf_counter() - t0) / iters
    flops = _flops_per_step(arch, seq, seq)
    peak = ctx["peak_tflops"]
    res = {"seq": seq, "layers": arch.text.num_layers, "hidden": arch.text.hidden_size,
           "heads": arch.text.num_heads, "kv_heads": arch.text.num_kv_heads, "ffn": arch.text.ffn_hidden_size,
           "vocab": arch.text.vocab_size, "step_seconds": dt, "tokens_per_s": seq / dt,
           "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / dt / 1e12,
           "peak_tflops": peak, "mfu": (flops / dt / 1e12 / peak) if peak else "n/a"}
    if cuda:
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ctx.setdefault("_models", {})["slice"] = model
    return res


def section_mfu(ctx) -> dict:
    import torch

    from megatron_vr1.models.qwen25_vl.model import ModelOptions

    cuda = ctx["cuda"]
    arch = _slice_arch(ctx, layers=4)
    seq = 4096 if cuda else 64
    return _time_slice(ctx, arch, ModelOptions(params_dtype=torch.bfloat16, use_te=False), seq,
                       iters=5 if cuda else 2, warmup=2 if cuda else 1) | {"spec": "local"}


def section_resync(ctx) -> dict:
    import torch

    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.rollout.resync import hf_buckets

    dev, cuda = ctx["device"], ctx["cuda"]
    arch = _slice_arch(ctx, layers=4)
    model = ctx.get("_models", {}).pop("slice", None)
    if model is None or model.config.num_layers != arch.text.num_layers:
        model = build_model(arch, ModelOptions(params_dtype=torch.bfloat16, use_te=False)).to(dev)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # a trained model keeps the vocabulary padding rows at zero; the resync checks it
        for name, p in model.named_parameters():
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                p[arch.text.vocab_size:] = 0
    # the HF-format model on the device: one tensor per HF name, preallocated like an engine's weights
    dest = {n: torch.empty_like(t) for b in hf_buckets(model, arch, include_vision=False) for n, t in b}
    nbytes = sum(t.numel() * t.element_size() for t in dest.values())

    def resync():
        for bucket in hf_buckets(model, arch, include_vision=False):
            for n, t in bucket:
                dest[n].copy_(t)

    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev)
    reps = 3 if cuda else 1
    timings = {}
    for name, fn in (("resync", resync), ("plain_copy", lambda: dst.copy_(src))):
        fn()
        sync(cuda)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(cuda)
        timings[name] = (time.perf_counter() - t0) / reps
    # bit-exactness of what landed: the embedding is stored as is
    emb = model.language_model.embedding.word_embeddings.weight if hasattr(model, "language_model") else None
    out = {"tensors": len(dest), "gib": nbytes / 2**30, "layers": arch.text.num_layers,
           "resync_gb_per_s": nbytes / timings["resync"] / 1e9, "plain_copy_gb_per_s": nbytes / timings["plain_copy"] / 1e9,
           "resync_seconds": timings["resync"], "plain_copy_seconds": timings["plain_copy"]}
    out["resync_vs_copy"] = out["resync_gb_per_s"] / out["plain_copy_gb_per_s"]
    if emb is not None:
        hf_emb = next((t for n, t in dest.items() if n.endswith("embed_tokens.weight")), None)
        out["embedding_equal"] = bool(hf_emb is not None and torch.equal(hf_emb[: emb.shape[0]], emb[: hf_emb.shape[0]]))
    del dest, src, dst, model
    return out


def section_te_fp8(ctx) -> dict:
    if not ctx["cuda"]:
        raise Skip("no CUDA (Transformer Engine and FP8 need a GPU)")
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Skip(f"Transformer Engine not installed ({type(e).__name__}: {e})") from None
    import torch

    from megatron_vr1.models.qwen25_vl.model import ModelOptions

    arch = _slice_arch(ctx, layers=4)
    out = {"transformer_engine": getattr(transformer_engine, "__version__", "?")}
    out["bf16"] = _time_slice(ctx, arch, ModelOptions(params_dtype=torch.bfloat16, use_te=True), 4096, 5, 2)
    ctx["_models"].pop("slice", None)
    major, _ = torch.cuda.get_device_capability()
    if major >= 9:
        out["fp8_hybrid"] = _time_slice(ctx, arch, ModelOptions(params_dtype=torch.bfloat16, use_te=True, fp8="hybrid"),
                                        4096, 5, 2)
        ctx["_models"].pop("slice", None)
    else:
        out["fp8_hybrid"] = f"skipped: compute capability {major}.x has no FP8"
    return out


def section_vllm(ctx) -> dict:
    if not ctx["cuda"]:
        raise Skip("no CUDA (the CPU vLLM is covered by tests/test_rollout.py)")
    try:
        import vllm
    except Exception as e:  # noqa: BLE001
        raise Skip(f"vLLM not installed ({type(e).__name__}: {e})") from None
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(ctx["tiny_hf"]), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=512, seed=0)
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(["What is 2 + 3?"] * 8, SamplingParams(max_tokens=32, temperature=0.0))
    gen = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    return {"vllm": vllm.__version__, "engine_start_seconds": start, "generated_tokens": n, "tokens_per_s": n / gen}


# ---------------------------------------------------------------------------------------------- driver
def environment(cuda: bool) -> dict:
    import torch

    env = {"python": _pyplatform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "host": socket.gethostname()}
    for mod, dist_name in (("transformers", "transformers"), ("megatron.core", "megatron-core"),
                           ("transformer_engine", "transformer-engine"), ("vllm", "vllm")):
        try:
            import importlib.metadata as md

            env[dist_name] = md.version(dist_name)
        except Exception:  # noqa: BLE001
            env[dist_name] = None
    return env


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['mode']}, {report['date']})", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["environment"].items()]
    lines += ["", "| section | status | seconds | figures |", "|---|---|---|---|"]
    for name in SECTIONS:
        s = report["sections"][name]
        figs = ""
        r = s.get("result") or {}
        if name == "parity" and r:
            figs = ", ".join(f"{k}: {v['ours_vs_fp32']:.3g} <= {v['tolerance']:.3g}" for k, v in r["probes"].items())
        elif name == "grpo" and r:
            figs = f"{r['backend']}, distributed optimizer {r['distributed_optimizer']}, loss {r['loss']:.4g}, grad norm {r['grad_norm']:.4g}"
        elif name == "mfu" and r:
            mfu = r["mfu"] if isinstance(r["mfu"], str) else f"{100 * r['mfu']:.1f}%"
            figs = f"{r['tokens_per_s']:.0f} tokens/s, {r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu} (seq {r['seq']}, {r['layers']} layers)"
        elif name == "resync" and r:
            figs = f"{r['resync_gb_per_s']:.1f} GB/s vs plain copy {r['plain_copy_gb_per_s']:.1f} GB/s ({r['gib']:.2f} GiB)"
        elif name == "te_fp8" and r:
            figs = "; ".join(f"{k}: {v['tokens_per_s']:.0f} tokens/s" if isinstance(v, dict) else f"{k}: {v}"
                             for k, v in r.items() if k != "transformer_engine")
        elif name == "vllm" and r:
            figs = f"{r['tokens_per_s']:.0f} tokens/s, engine start {r['engine_start_seconds']:.0f} s"
        elif s["status"] != "ok":
            figs = s.get("reason") or s.get("error", "").strip().splitlines()[-1:][0] if s.get("error") else s.get("reason", "")
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} | {figs} |")
    lines += ["", f"Total {report['total_seconds']:.0f} s; result: **{'PASS' if report['ok'] else 'FAIL'}**", ""]
    return "\n".join(lines)


def prepare_wheels(folder: Path) -> int:
    pin = next(line.strip() for line in (REPO / "requirements-gpu.txt").read_text().splitlines()
               if line.startswith("megatron-core=="))
    folder.mkdir(parents=True, exist_ok=True)
    plats = [f"manylinux_2_{i}_x86_64" for i in range(35, 16, -1)] + ["manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--ignore-requires-python", *[a for p in plats for a in ("--platform", p)], "-d", str(folder), pin]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    print(f"prepare-wheels: {sorted(p.name for p in folder.glob('*.whl'))} in {folder}" if rc == 0 else
          f"prepare-wheels: pip download failed ({rc})", flush=True)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--cpu-smoke", action="store_true", help="run every section on CPU at toy sizes")
    ap.add_argument("--prepare-wheels", type=Path, metavar="DIR", help="download the megatron-core wheel and exit")
    ap.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: from the device name)")
    args = ap.parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(args.prepare_wheels)

    t_start = time.perf_counter()
    import torch
    import torch.distributed as _dist

    owned_group = not _dist.is_initialized()  # tear down only a process group this call created

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("gpu_check: no CUDA device; use --cpu-smoke to run the toy-size check on CPU", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the platform shims need CUDA to look absent
        torch.cuda.is_available = lambda: False  # noqa: E731 (already imported torch may have looked)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = {"cuda": cuda, "device": torch.device("cuda", 0) if cuda else torch.device("cpu")}
    env = environment(cuda)
    ctx["peak_tflops"] = args.peak_tflops or (peak_tflops(env["device"]) if cuda else None)
    report = {"mode": "gpu" if cuda else "cpu-smoke", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "environment": env, "peak_tflops": ctx["peak_tflops"], "sections": {}}
    setup_error = None
    try:
        init_single_rank(cuda)
        ctx["tiny_hf"], ctx["tiny_mcore"] = tiny_checkpoints(args.out / "work")
    except Exception:  # noqa: BLE001
        setup_error = traceback.format_exc()
    report["setup_seconds"] = time.perf_counter() - t_start
    for name in SECTIONS:
        t0 = time.perf_counter()
        if args.only and name not in args.only:
            entry = {"status": "skipped", "reason": "skipped: not selected (--only)"}
        elif setup_error:
            entry = {"status": "failed", "error": "set-up failed:\n" + setup_error[-4000:]}
        else:
            try:
                entry = {"status": "ok", "result": globals()[f"section_{name}"](ctx)}
            except Skip as e:
                entry = {"status": "skipped", "reason": f"skipped: {e}"}
            except Exception:  # noqa: BLE001
                entry = {"status": "failed", "error": traceback.format_exc()[-4000:]}
        if cuda:
            torch.cuda.empty_cache()
        entry["seconds"] = time.perf_counter() - t0
        report["sections"][name] = entry
        print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']:.1f} s)"
              + (f" {entry.get('reason', '')}" if entry["status"] == "skipped" else "")
              + (f"\n{entry['error']}" if entry["status"] == "failed" else ""), flush=True)
    report["total_seconds"] = time.perf_counter() - t_start
    report["ok"] = all(s["status"] != "failed" for s in report["sections"].values())
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    try:
        if owned_group and _dist.is_initialized():
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
            _dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
