"""`megatron-vr1 plan CONFIG`: will a recipe fit in GPU memory? A per-GPU estimate, before any job.

The parameter count comes from the HF config.json (model.hf_path; configs/arch/<name> holds
architecture-only copies), the layout from `parallel`, the GPUs from `slurm` (nodes x
gpus_per_node, slurm.gpu_memory_gib each). The busiest GPU is the first pipeline stage (the
embedding, the vision tower, its layers and pp micro-batches of activations in flight under 1F1B)
or the last (the output layer and the logits); both are computed and the larger counts.

Per GPU, with P = parameters of the stage / TP (norms are replicated), T = its trainable part:
  weights        P x 2 bytes (bf16) or 4 (fp32)
  reference      the same again when grpo.kl_beta > 0 (RL: the frozen cold-start model)
  grads          T x 4 (megatron-core DDP keeps fp32 main grads: grad_reduce_in_fp32)
  optimizer      T x (4 fp32 master [bf16 only] + 8 Adam moments) / DP (distributed optimizer)
  activations    per micro-batch of s tokens (RL: max prompt + max response; SFT: sft.max_length),
                 activation bytes a, per layer a*s*b*(4h/t_sp + (2h + 2*kv*d)/t + 3F/t) without
                 recompute (norm/linear inputs, q/k/v, attention output, fc1 output [gate; up], SwiGLU
                 output; flash attention stores no s x s scores), a*s*b*h/t_sp per layer with full
                 recompute plus one layer's worth; x pp micro-batches in flight on the first stage;
                 fp32 logits and their gradient on the last stage (2 x 4*s*b*V/t); a trainable vision
                 tower adds a*patches*b*(5*hv + 3*Fv)/t per vision layer (one image at data.max_pixels).
  rollout engine (RL only) vLLM takes rollout.gpu_memory_utilization x the GPU while rolling out:
                 its weights (all parameters / engine TP: each GPU is one shard of an engine replica
                 spanning engine-TP GPUs; engine TP = --rollout-tp, else rollout.tensor_parallel_size,
                 else parallel.tp), ~2 GiB of profiled activations, the rest is KV cache
                 (2*L*max(1, kv_heads/engine TP)*d*a per token). It sleeps (sleep mode level 1: weights
                 to host, KV dropped) while training. The engine TP must split the model as vLLM does
                 (rollout/layout.py): an engine TP that does not is refused before any estimate.
  overhead       3 GiB: CUDA context, NCCL buffers, allocator fragmentation.
Two peaks are checked: rollout (persistent state + the engine's share) and training (persistent
state + activations + overhead). When one does not fit, the command exits with status 2 and names
the changes that would make it fit (raise TP, PP, recompute, the engine TP, more nodes, a smaller
engine share).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace

GiB = 2**30
OVERHEAD_BYTES = 3 * GiB
ENGINE_ACTIVATION_BYTES = 2 * GiB


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of Qwen2.5-VL as Megatron holds it (tensor-parallel parts and replicated norms split)."""

    layer_split: int
    """Per language-model layer: the TP-split tensors (q, k, v, o, their biases, fc1, fc2)."""
    layer_norms: int
    """Per language-model layer: the two RMSNorm weights (replicated over TP)."""
    layers: int
    embedding: int
    output: int
    """The output layer (0 when tied to the embedding)."""
    final_norm: int
    vision: int
    """Vision tower and merger."""

    @property
    def total(self) -> int:
        return (self.layers * (self.layer_split + self.layer_norms) + self.embedding + self.output
                + self.final_norm + self.vision)


def param_counts(arch) -> ParamCounts:
    """From the HF architecture; Qwen2.5-VL-7B gives 8,292,166,656 (the hub's count)."""
    t, v = arch.text, arch.vision
    h, f, kvd = t.hidden_size, t.ffn_hidden_size, t.num_kv_heads * t.head_dim
    qd = t.num_heads * t.head_dim
    split = h * qd + 2 * h * kvd + qd + 2 * kvd + qd * h + 3 * h * f  # qkv (+bias), o, [gate; up], down
    vh, vf = v.hidden_size, v.intermediate_size
    block = (3 * vh * vh + 3 * vh) + (vh * vh + vh) + (2 * vh * vf + 2 * vf) + (vf * vh + vh) + 2 * vh
    merged = vh * v.spatial_merge_size ** 2
    merger = vh + merged * merged + merged + merged * v.out_hidden_size + v.out_hidden_size
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * vh
    return ParamCounts(
        layer_split=split, layer_norms=2 * h, layers=t.num_layers, embedding=t.vocab_size * h,
        output=0 if t.tie_word_embeddings else t.vocab_size * h, final_norm=h,
        vision=patch + v.depth * block + merger,
    )


# ----------------------------------------------------------------------------- the estimate


@dataclass
class Layout:
    tp: int
    pp: int
    sequence_parallel: bool
    micro_batch_size: int
    recompute: bool
    nodes: int
    gpus_per_node: int
    gpu_gib: float
    rollout_util: float
    rollout_tp: int

    @property
    def dp(self) -> int:
        return self.nodes * self.gpus_per_node // (self.tp * self.pp)


@dataclass
class Plan:
    mode: str
    """rl or sft."""
    layout: Layout
    seq_len: int
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    """(component, bytes on the busiest GPU, how it was counted)."""
    train_peak: float = 0.0
    rollout_peak: float = 0.0
    kv_tokens: int = 0
    """Tokens the engine's KV cache holds (RL)."""
    problems: list[str] = field(default_factory=list)

    @property
    def gpu_bytes(self) -> float:
        return self.layout.gpu_gib * GiB

    @property
    def fits(self) -> bool:
        return not self.problems


def layout_from(cfg, *, gpu_gib=None, rollout_tp=None) -> Layout:
    s = cfg.slurm
    return Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, sequence_parallel=cfg.parallel.sequence_parallel,
                  micro_batch_size=cfg.parallel.micro_batch_size, recompute=getattr(cfg.parallel, "recompute", False),
                  nodes=s.nodes, gpus_per_node=s.gpus_per_node or s.procs, gpu_gib=gpu_gib or s.gpu_memory_gib,
                  rollout_util=cfg.rollout.gpu_memory_utilization,
                  rollout_tp=rollout_tp or cfg.rollout.tensor_parallel_size or cfg.parallel.tp)


def check_layout(arch, layout: "Layout", mode: str = "rl") -> None:
    """ValueError (naming the size and the TPs that work) when the rollout engine cannot be laid out:
    vLLM cannot split the model at the engine TP, or the engine TP does not divide the GPUs."""
    from megatron_vr1.rollout.layout import check_rollout_tp, check_world

    if mode != "rl":
        return
    check_rollout_tp(arch, layout.rollout_tp, "--rollout-tp / rollout.tensor_parallel_size / parallel.tp")
    check_world(layout.nodes * layout.gpus_per_node, layout.rollout_tp)


def detect_mode(cfg) -> str:
    """rl for a GRPO recipe (data.train_path), sft for a cold-start one (sft.data_path only)."""
    return "sft" if cfg.data.train_path is None and cfg.sft.data_path is not None else "rl"


def estimate(cfg, arch, layout: Layout, mode: str) -> Plan:
    t, v = arch.text, arch.vision
    pc = param_counts(arch)
    w = 2 if cfg.model.params_dtype == "bfloat16" else 4
    a = w  # activations in the params dtype
    tp, pp = layout.tp, layout.pp
    t_sp = tp if layout.sequence_parallel else 1
    b = layout.micro_batch_size
    if mode == "rl":
        enabled = [s for s in cfg.ptst.stages if s.enabled]
        s_len = cfg.data.max_prompt_length + max(s.max_response_length for s in enabled)
    else:
        s_len = cfg.sft.max_length
    plan = Plan(mode, layout, s_len)
    layers_per_stage = t.num_layers // pp
    layer = pc.layer_split / tp + pc.layer_norms
    vision_trainable = not cfg.model.freeze_vision
    h, f, kvd = t.hidden_size, t.ffn_hidden_size, t.num_kv_heads * t.head_dim
    per_layer_full = a * s_len * b * (4 * h / t_sp + (2 * h + 2 * kvd) / tp + 3 * f / tp)
    per_layer_ckpt = a * s_len * b * h / t_sp
    patches = cfg.data.max_pixels // (v.patch_size ** 2)

    stages = {"first": 0, "last": pp - 1} if pp > 1 else {"only": 0}
    best = None
    for where, idx in stages.items():
        first, last = idx == 0, idx == pp - 1
        params = layers_per_stage * layer
        trainable = params
        if first:
            params += pc.embedding / tp + pc.vision / tp
            trainable += pc.embedding / tp + (pc.vision / tp if vision_trainable else 0)
        if last:
            params += pc.output / tp + pc.final_norm
            trainable += pc.output / tp + pc.final_norm
        in_flight = (pp - idx) if pp > 1 else 1
        if layout.recompute:
            act = in_flight * layers_per_stage * per_layer_ckpt + per_layer_full
            act_how = f"{in_flight} micro-batch(es) x {layers_per_stage} layers x a*s*b*h/t_sp + one layer recomputed"
        else:
            act = in_flight * layers_per_stage * per_layer_full
            act_how = f"{in_flight} micro-batch(es) x {layers_per_stage} layers x a*s*b*(4h/t_sp+(2h+2kv*d)/t+3F/t)"
        if last:
            act += 2 * 4 * s_len * b * t.vocab_size / tp
            act_how += " + fp32 logits and grad 8*s*b*V/t"
        if first and vision_trainable:
            act += in_flight * v.depth * a * patches * b * (5 * v.hidden_size + 3 * v.intermediate_size) / tp
            act_how += f" + vision ({patches} patches/image)"
        rows = [
            ("weights", params * w, f"{params / 1e9:.3f}B params x {w} bytes (TP {tp}, PP {pp}, {where} stage)"),
        ]
        if mode == "rl" and cfg.grpo.kl_beta > 0:
            rows.append(("reference model", params * w, "the frozen cold-start model, same layout"))
        rows += [
            ("gradients", trainable * 4, f"{trainable / 1e9:.3f}B trainable x 4 bytes (fp32 main grads)"),
            ("optimizer", trainable * ((4 if w == 2 else 0) + 8) / layout.dp,
             f"Adam {'fp32 master + ' if w == 2 else ''}2 moments, sharded over DP {layout.dp}"),
            ("activations", act, act_how + f"; s={s_len}, b={b}"),
            ("overhead", OVERHEAD_BYTES, "CUDA context, NCCL buffers, fragmentation"),
        ]
        persistent = sum(r[1] for r in rows if r[0] in ("weights", "reference model", "gradients", "optimizer"))
        train_peak = persistent + act + OVERHEAD_BYTES
        rollout_peak = 0.0
        if mode == "rl":
            engine = layout.rollout_util * plan.gpu_bytes
            rows.append(("rollout engine", engine, f"rollout.gpu_memory_utilization {layout.rollout_util} x "
                                                   f"{layout.gpu_gib:g} GiB while rolling out (asleep while training)"))
            rollout_peak = persistent + engine + OVERHEAD_BYTES
        if best is None or max(train_peak, rollout_peak) > max(best[1], best[2]):
            best = (rows, train_peak, rollout_peak)
    plan.rows, plan.train_peak, plan.rollout_peak = best

    gpu = plan.gpu_bytes
    if plan.train_peak > gpu:
        plan.problems.append(f"training needs {plan.train_peak / GiB:.1f} GiB per GPU, the GPU has {layout.gpu_gib:g}")
    if mode == "rl":
        engine_w = pc.total * w / layout.rollout_tp
        kv = layout.rollout_util * gpu - engine_w - ENGINE_ACTIVATION_BYTES
        kv_heads = max(1, t.num_kv_heads // layout.rollout_tp)
        per_token = 2 * t.num_layers * kv_heads * t.head_dim * a
        plan.kv_tokens = max(0, int(kv // per_token))
        plan.rows.append(("  engine weights", engine_w,
                                          f"{pc.total / 1e9:.2f}B params / engine TP {layout.rollout_tp}"))
        plan.rows.append(("  engine KV cache", max(kv, 0.0), f"{plan.kv_tokens} tokens = "
                          f"{plan.kv_tokens / s_len:.1f} sequences of {s_len} ({per_token / 1024:.0f} KiB/token)"))
        if plan.rollout_peak > gpu:
            plan.problems.append(f"rollout needs {plan.rollout_peak / GiB:.1f} GiB per GPU, the GPU has {layout.gpu_gib:g}")
        if plan.kv_tokens < s_len:
            plan.problems.append(f"the engine's KV cache holds {plan.kv_tokens} tokens, less than one sequence "
                                 f"({s_len}); raise rollout.gpu_memory_utilization or the engine TP")
    return plan


# ----------------------------------------------------------------------------- fixes


def _valid_tp(arch, limit: int) -> list[int]:
    t = arch.text
    g = math.gcd(t.num_heads, t.num_kv_heads, t.ffn_hidden_size)
    return [d for d in range(1, limit + 1) if g % d == 0]


def fixes(cfg, arch, layout: Layout, mode: str) -> list[str]:
    """For each kind of change (TP, PP, recompute, engine share, nodes) the smallest one that makes
    the plan fit; TP x PP pairs only when no single change does."""
    from megatron_vr1.rollout.layout import valid_rollout_tps

    tps = [d for d in _valid_tp(arch, layout.gpus_per_node) if d > layout.tp]
    engine_tps = [d for d in valid_rollout_tps(arch, layout.gpus_per_node) if d > layout.rollout_tp]
    pps = [d for d in range(layout.pp + 1, arch.text.num_layers + 1) if arch.text.num_layers % d == 0]
    kinds: list[list[tuple[str, Layout]]] = [
        [(f"raise parallel.tp to {tp}", replace(layout, tp=tp, rollout_tp=max(layout.rollout_tp, tp))) for tp in tps],
        [(f"raise parallel.pp to {pp}", replace(layout, pp=pp)) for pp in pps],
        [("set parallel.recompute=true", replace(layout, recompute=True))] if not layout.recompute else [],
        [(f"raise rollout.tensor_parallel_size to {t}", replace(layout, rollout_tp=t))
         for t in engine_tps if mode == "rl" and (layout.nodes * layout.gpus_per_node) % t == 0],
        [(f"lower rollout.gpu_memory_utilization to {u}", replace(layout, rollout_util=u))
         for u in (0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25) if mode == "rl" and u < layout.rollout_util],
        [(f"raise slurm.nodes to {n} (DP {n * layout.gpus_per_node // (layout.tp * layout.pp)})", replace(layout, nodes=n))
         for n in (layout.nodes * 2, layout.nodes * 4)],
    ]
    out = []
    for kind in kinds:
        for text, lay in kind:
            if (lay.nodes * lay.gpus_per_node) % (lay.tp * lay.pp):
                continue
            p = estimate(cfg, arch, lay, mode)
            if p.fits:
                out.append(f"{text} (peak {max(p.train_peak, p.rollout_peak) / GiB:.1f} GiB)")
                break
    if not out:
        for tp in tps or [layout.tp]:
            for pp in pps:
                lay = replace(layout, tp=tp, pp=pp, rollout_tp=max(layout.rollout_tp, tp))
                if (lay.nodes * lay.gpus_per_node) % (tp * pp) == 0 and estimate(cfg, arch, lay, mode).fits:
                    return [f"set parallel.tp={tp} and parallel.pp={pp}"]
    return out


# ----------------------------------------------------------------------------- command


def format_plan(plan: Plan, arch) -> str:
    lay = plan.layout
    lines = [f"{plan.mode.upper()} on {lay.nodes} x {lay.gpus_per_node} GPUs of {lay.gpu_gib:g} GiB: TP {lay.tp}, "
             f"PP {lay.pp}, DP {lay.dp}, micro-batch {lay.micro_batch_size} x {plan.seq_len} tokens, "
             f"recompute {'on' if lay.recompute else 'off'}, sequence parallel {'on' if lay.sequence_parallel else 'off'}"
             f" ({param_counts(arch).total / 1e9:.2f}B parameters, {arch.path})",
             f"{'component':<20} {'GiB':>8}  how"]
    for name, value, how in plan.rows:
        lines.append(f"{name:<20} {value / GiB:>8.2f}  {how}")
    ref = "+reference" if any(n == "reference model" for n, _, _ in plan.rows) else ""
    lines.append(f"{'peak, training':<20} {plan.train_peak / GiB:>8.2f}  weights{ref}+grads+optimizer+activations+overhead")
    if plan.mode == "rl":
        lines.append(f"{'peak, rollout':<20} {plan.rollout_peak / GiB:>8.2f}  weights{ref}+grads+optimizer+engine+overhead")
    return "\n".join(lines)


def check_fits(cfg, arch, where: str = "the recipe") -> None:
    """Raises ValueError naming the components and the fix when `cfg`'s jobs do not fit its GPUs
    (what `slurm submit` runs before anything reaches the queue)."""
    layout = layout_from(cfg)
    mode = detect_mode(cfg)
    check_layout(arch, layout, mode)
    plan = estimate(cfg, arch, layout, mode)
    if plan.fits:
        return
    fix = fixes(cfg, arch, layout, mode)
    raise ValueError(
        f"{where} does not fit {layout.gpu_gib:g} GiB GPUs ({'; '.join(plan.problems)}); "
        f"fix: {' or '.join(fix) if fix else 'use more GPUs per model replica'} "
        "(see `megatron-vr1 plan`; --no-plan-check submits anyway)"
    )


def add_arguments(parser) -> None:
    from megatron_vr1.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU (default slurm.gpu_memory_gib, 80)")
    parser.add_argument("--rollout-tp", type=int, help="tensor parallelism of the rollout engine (default parallel.tp)")
    parser.add_argument("--mode", choices=("rl", "sft"), help="default: rl when data.train_path is set, else sft")


def run(args) -> int:
    cfg, arch = args.cfg, args.arch
    layout = layout_from(cfg, gpu_gib=args.gpu_memory_gib, rollout_tp=args.rollout_tp)
    cfg.parallel.dp(layout.nodes * layout.gpus_per_node)  # tp*pp must divide the GPUs
    mode = args.mode or detect_mode(cfg)
    check_layout(arch, layout, mode)  # a layout vLLM cannot build is refused before any estimate
    plan = estimate(cfg, arch, layout, mode)
    print(format_plan(plan, arch))
    if plan.fits:
        print(f"fits: peak {max(plan.train_peak, plan.rollout_peak) / GiB:.1f} GiB of {layout.gpu_gib:g} GiB per GPU")
        return 0
    fix = fixes(cfg, arch, layout, mode)
    print("DOES NOT FIT: " + "; ".join(plan.problems), file=sys.stderr)
    print("fix: " + (" or ".join(fix) if fix else "no single change found; use more GPUs per model replica"),
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    from megatron_vr1.cli import main

    sys.exit(main(["plan", *sys.argv[1:]]))
