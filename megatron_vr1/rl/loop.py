"""GRPO with PTST: the training loop. `train()` reads as the algorithm; the pieces follow it.

Per step: rollout (vLLM) -> reward (HFRRF) -> group advantages -> old/ref logprobs (Megatron,
forward only) -> policy update (mini-batches x epochs) -> resync the engine -> log, eval, save.
PTST stages (ptst.stages) change the response-length cap and the group size; each stage ends
with a checkpoint, and a run resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_vr1 import platform

log = logging.getLogger("megatron_vr1.rl")


@dataclass
class LoopState:
    stage: int = 0
    step_in_stage: int = 0
    global_step: int = 0
    sampler: dict = field(default_factory=dict)
    best_val: float = -1.0
    """Best validation accuracy so far; its checkpoint is `checkpoints/best`."""


@dataclass
class RLRun:
    cfg: object
    arch: object
    run_dir: Path
    model: object          # DDP-wrapped policy chunk
    optimizer: object
    ref: Optional[object]  # frozen reference chunk (None when kl_beta == 0)
    engine: Optional[object]  # the engine this rank generates with: the first rank of each model-parallel group
    processor: object
    sampler: object
    val_rows: list
    sink: object
    state: LoopState
    idle_engine: Optional[object] = None  # the other ranks' engine: built, never used (see setup)


# ----------------------------------------------------------------------------- the algorithm


def train(cfg, arch, start_stage: int = 0) -> Path:
    from megatron_vr1 import preemption

    stop = preemption.install()  # SIGUSR1 (time limit) / SIGTERM: save after this step, exit for a requeue
    run = setup(cfg, arch, start_stage)
    stages = [s for s in cfg.ptst.stages if s.enabled]
    for stage_index in range(run.state.stage, len(stages)):
        stage = stages[stage_index]
        while run.state.step_in_stage < stage.steps:
            set_lr(run, rl_lr(cfg, stages, stage, run.state.global_step + 1))
            t = Timer()
            prompts = this_replicas_share(run.sampler.next_batch())
            with t("rollout"):
                rollouts = generate(run, prompts, stage)
            scored = score(run, prompts, rollouts, stage.group_size)
            with t("logprobs"):
                batches, seq_len = prepare_batches(run, scored)
            with t("update"):
                update = policy_updates(run, batches, seq_len)
            with t("resync"):
                resync(run)
            run.state.step_in_stage += 1
            run.state.global_step += 1
            log_step(run, stage_index, stage, scored, batches, update, t)
            maybe_eval(run, stage)
            stopping = stop.requested() and run.state.step_in_stage < stage.steps  # agreed by all ranks
            if stopping or (run.state.step_in_stage % cfg.checkpoint.save_interval == 0
                            and run.state.step_in_stage < stage.steps):
                save(run, f"stage{stage_index}_step{run.state.step_in_stage:05d}")
            if stopping:
                finish(run)
                preemption.exit_preempted()
        run.state.stage, run.state.step_in_stage = stage_index + 1, 0
        save(run, f"stage{stage_index}_end")
        if stop.requested() and stage_index + 1 < len(stages):
            finish(run)
            preemption.exit_preempted()
    finish(run)
    return run.run_dir


# ----------------------------------------------------------------------------- set-up


def _first_of_model_parallel_group() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def setup(cfg, arch, start_stage: int = 0) -> RLRun:
    from megatron_vr1.checkpointing import latest_checkpoint, load_checkpoint
    from megatron_vr1.data.rl_dataset import PromptSampler, load_rl_rows
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.monitoring.sinks import make_sink
    from megatron_vr1.rl.update import build_optimizer, wrap_ddp

    if cfg.model.mcore_path is None:
        raise ValueError("model.mcore_path is not set: point it at the cold-start checkpoint "
                         "(megatron-vr1 sft ...) or a converted one (megatron-vr1 convert hf-to-mcore ...)")
    if cfg.data.train_path is None:
        raise ValueError("data.train_path is not set: a parquet in the Vision-R1-rl schema (images, problem, answer)")
    rows = load_rl_rows(cfg.data.train_path)  # bad rows are counted and skipped before any model is built
    val_rows = load_rl_rows(cfg.data.val_path) if cfg.data.val_path else []
    platform.init_distributed(cfg.parallel, cfg.seed)
    rank = dist.get_rank()
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_resolved(run_dir)
    opts = ModelOptions.from_config(cfg)
    model = build_model(arch, opts)
    load_weights(model, cfg.model.mcore_path)
    ref = None
    if cfg.grpo.kl_beta > 0:
        ref = build_model(arch, opts)
        load_weights(ref, cfg.model.mcore_path)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    ddp = wrap_ddp(model, model.config)
    optimizer = build_optimizer(ddp, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                                eps=cfg.optim.eps, grad_clip=cfg.optim.grad_clip)
    sampler = PromptSampler(rows, cfg.rollout.prompts_per_step, seed=cfg.seed)
    state = LoopState(stage=start_stage)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, ddp, optimizer)
        state = LoopState(**loaded)
        sampler.load_state_dict(state.sampler)
        log.info("resumed from %s (stage %d, step %d)", ckpt, state.stage, state.step_in_stage)
    # Every rank builds an engine: vLLM's start-up creates process groups over the whole world, a
    # collective that hangs if only some ranks take part (seen as a TP=2 run stuck in engine start).
    # On CPU (one TP=1 engine per rank) only the first rank of each model-parallel group generates.
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    max_len = max(s.max_response_length for s in cfg.ptst.stages if s.enabled) + cfg.data.max_prompt_length
    kv = int(cfg.rollout.kv_cache_gib * 2**30) if cfg.rollout.kv_cache_gib else None
    engine = VLLMEngine(cfg.model.hf_path, arch, dtype=cfg.model.params_dtype, max_model_len=max_len,
                        kv_cache_bytes=kv, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                        seed=cfg.seed, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    idle = None
    if not _first_of_model_parallel_group():
        engine, idle = None, engine
    sink = make_sink(run_dir, wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode, rank=rank)
    run = RLRun(cfg, arch, run_dir, ddp, optimizer, ref, engine,
                load_processor(cfg.model.hf_path, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels), sampler,
                val_rows, sink, state, idle_engine=idle)
    resync(run, full=True)  # the engine starts from the HF weights; the policy may be the cold-start checkpoint
    if state.global_step == 0:  # the cold start is the first candidate for `best`
        stages = [s for s in cfg.ptst.stages if s.enabled]
        maybe_eval(run, stages[min(state.stage, len(stages) - 1)])
    return run


# ----------------------------------------------------------------------------- the steps


def generate(run: RLRun, rows, stage):
    """Rollouts for this step's prompts on the model-parallel group's first rank, shared with the
    others of the group."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.data.rl_dataset import build_prompt
    from megatron_vr1.rollout.engine import SamplingSettings

    groups = None
    if run.engine is not None:
        prompts = [build_prompt(r, run.processor, run.cfg.data.system_prompt) for r in rows]
        sampling = SamplingSettings(n=stage.group_size, max_tokens=stage.max_response_length,
                                    temperature=run.cfg.rollout.temperature, top_p=run.cfg.rollout.top_p,
                                    seed=run.cfg.seed * 1_000_003 + run.state.global_step)
        groups = run.engine.generate(prompts, sampling)
    if ps.get_model_parallel_group().size() > 1:
        box = [groups]
        src = dist.get_global_rank(ps.get_model_parallel_group(), 0)
        dist.broadcast_object_list(box, src=src, group=ps.get_model_parallel_group())
        groups = box[0]
    return groups


def this_replicas_share(rows):
    """Each data-parallel replica rolls out its own slice of the step's prompts."""
    from megatron.core import parallel_state as ps

    return rows[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]


def score(run: RLRun, rows, groups, group_size: int):
    from megatron_vr1.rewards import score_batch
    from megatron_vr1.rl.batch import ScoredRollout
    from megatron_vr1.rl.grpo import group_advantages

    flat = [r for g in groups for r in g]
    truths = [rows[r.prompt_index].answer for r in flat]
    results = score_batch([r.response_text for r in flat], truths, reward=run.cfg.grpo.reward)
    rewards = torch.tensor([x.reward for x in results], dtype=torch.float64)
    adv = group_advantages(rewards, group_size, scale="none" if run.cfg.grpo.advantage == "drgrpo" else "std",
                           eps=run.cfg.grpo.adv_eps)
    return [ScoredRollout(r, x.reward, x.correct, x.format_ok, float(a)) for r, x, a in zip(flat, results, adv)]


def prepare_batches(run: RLRun, scored):
    """Micro-batches with the trainer's own old logprobs (and the reference's)."""
    from megatron_vr1.rl.batch import collate
    from megatron_vr1.rl.forward import sequence_logprobs

    pad = run.processor.tokenizer.pad_token_id
    batches, seq_len = collate(scored, run.processor, run.arch, run.cfg.parallel.micro_batch_size, pad)
    model = run.model.module
    for mb in batches:
        mb.old_logp_BT = sequence_logprobs(model, run.arch, mb.inputs, temperature=run.cfg.rollout.temperature) * mb.loss_mask_BT
        if run.ref is not None:
            mb.ref_logp_BT = sequence_logprobs(run.ref, run.arch, mb.inputs, temperature=run.cfg.rollout.temperature) * mb.loss_mask_BT
    return batches, seq_len


def policy_updates(run: RLRun, batches, seq_len):
    """`grpo.epochs_per_rollout` passes over the rollout batch in mini-batches of
    `grpo.minibatch_prompts` prompts (x group size), one optimizer step each."""
    from megatron_vr1.rl.update import LossSettings, policy_update

    g = run.cfg.grpo
    loss = LossSettings(clip_low=g.clip_low, clip_high=g.clip_high, kl_beta=g.kl_beta, agg=g.loss_agg,
                        tis_cap=g.tis_cap, temperature=run.cfg.rollout.temperature)
    per_step = max(1, math.ceil(len(batches) * g.minibatch_prompts / max(1, run.cfg.rollout.prompts_per_step)))
    results = []
    for _ in range(g.epochs_per_rollout):
        for i in range(0, len(batches), per_step):
            mbs = batches[i:i + per_step]
            counts = torch.tensor([float(sum(mb.loss_mask_BT.sum() for mb in mbs)),
                                   float(sum(mb.loss_mask_BT.shape[0] for mb in mbs))], dtype=torch.float64)
            from megatron.core import parallel_state as ps

            if ps.get_data_parallel_world_size() > 1:  # the global batch spans the replicas
                dist.all_reduce(counts, group=ps.get_data_parallel_group())
            tokens, seqs = counts.tolist()
            if tokens == 0:
                continue
            results.append(policy_update(run.model, run.optimizer, mbs, run.arch, loss, tokens, seqs, seq_len))
    return results


def resync(run: RLRun, full: bool = False) -> None:
    """Push the policy's weights into the engine (a frozen vision tower only when `full`)."""
    from megatron_vr1.rollout.resync import hf_buckets

    buckets = hf_buckets(run.model.module, run.arch, include_vision=full or not run.cfg.model.freeze_vision)
    if run.engine is not None:
        run.engine.update_weights(buckets)
    else:
        for _ in buckets:  # collectives: every rank takes part
            pass


def evaluate(run: RLRun, max_tokens: int) -> Optional[float]:
    """Greedy accuracy (HFRRF reward 1) on the validation rows."""
    from megatron_vr1.data.rl_dataset import build_prompt
    from megatron_vr1.rewards import score_batch
    from megatron_vr1.rollout.engine import SamplingSettings

    if not run.val_rows or run.engine is None:
        return None
    prompts = [build_prompt(r, run.processor, run.cfg.data.system_prompt) for r in run.val_rows]
    groups = run.engine.generate(prompts, SamplingSettings(n=1, max_tokens=max_tokens, temperature=0.0))
    res = score_batch([g[0].response_text for g in groups], [r.answer for r in run.val_rows], reward="hfrrf")
    acc = float(np.mean([x.reward for x in res]))
    lens = [len(g[0].response_ids) for g in groups]
    run.sink.log({"eval/accuracy": acc, "eval/len_mean": float(np.mean(lens))}, run.state.global_step)
    return acc


def maybe_eval(run: RLRun, stage) -> None:
    """Validation accuracy every `logging.val_interval` steps; the best policy is kept as
    `checkpoints/best` (model selection on the validation split, never on the test set)."""
    n = run.cfg.logging.val_interval
    if not (n and run.state.global_step % n == 0):
        return
    box = [evaluate(run, stage.max_response_length)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    acc = box[0]
    if acc is not None and acc > run.state.best_val:
        run.state.best_val = acc
        save(run, "best", update_latest=False)


def rl_lr(cfg, stages, stage, step: int) -> float:
    """Learning rate of RL step `step` (1-based, counted over the run's enabled stages): optim.lr
    (or the stage's own lr) with optim.warmup_ratio's linear warmup and optim.lr_schedule."""
    from megatron_vr1.schedule import lr_at, warmup_steps

    total = sum(s.steps for s in stages)
    peak = stage.lr if stage.lr is not None else cfg.optim.lr
    return lr_at(step, total, peak, warmup_steps(total, cfg.optim.warmup_ratio), cfg.optim.lr_schedule)


def set_lr(run: RLRun, lr: float) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = lr


def save(run: RLRun, tag: str, update_latest: bool = True) -> None:
    from megatron_vr1.checkpointing import save_checkpoint

    run.state.sampler = run.sampler.state_dict()
    save_checkpoint(run.run_dir, tag, run.model, run.optimizer, vars(run.state).copy(), run.cfg.model.hf_path,
                    update_latest=update_latest)


def finish(run: RLRun) -> None:
    run.sink.flush()
    run.sink.close()


# ----------------------------------------------------------------------------- metrics


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _T()


def log_step(run: RLRun, stage_index, stage, scored, batches, updates, t: Timer) -> None:
    from megatron_vr1.rollout.engine import logprob_mismatch

    lens = np.array([len(s.rollout.response_ids) for s in scored])
    old = torch.cat([mb.old_logp_BT.flatten() for mb in batches])
    eng = torch.cat([mb.engine_logp_BT.flatten() for mb in batches])
    mask = torch.cat([mb.loss_mask_BT.flatten() for mb in batches])
    mm = logprob_mismatch(old, eng, mask)
    total = sum(t.seconds.values())
    m = {
        "reward/mean": float(np.mean([s.reward for s in scored])),
        "reward/accuracy": float(np.mean([s.correct for s in scored])),
        "reward/format_rate": float(np.mean([s.format_ok for s in scored])),
        "rollout/len_mean": float(lens.mean()), "rollout/len_p50": float(np.percentile(lens, 50)),
        "rollout/len_p90": float(np.percentile(lens, 90)), "rollout/len_max": float(lens.max()),
        "rollout/truncation_rate": float(np.mean([s.rollout.finish_reason == "length" for s in scored])),
        "train/loss": float(np.mean([u.loss for u in updates])) if updates else 0.0,
        "train/kl": float(np.mean([u.kl for u in updates])) if updates else 0.0,
        "train/clip_frac": float(np.mean([u.clip_frac for u in updates])) if updates else 0.0,
        "train/entropy": float(np.mean([u.entropy for u in updates])) if updates else 0.0,
        "train/grad_norm": float(np.mean([u.grad_norm for u in updates])) if updates else 0.0,
        "train/lr": float(run.optimizer.param_groups[0]["lr"]),
        "train/optimizer_steps": float(len(updates)),
        "mismatch/mean_abs": mm.mean_abs, "mismatch/max_abs": mm.max_abs, "mismatch/mult_prob_error": mm.mult_prob_error,
        "ptst/stage": float(stage_index), "ptst/max_response_length": float(stage.max_response_length),
        "ptst/group_size": float(stage.group_size),
        "perf/tokens_per_s": float(lens.sum() / max(total, 1e-9)),
        **{f"perf/{k}_s": v for k, v in t.seconds.items()},
    }
    run.sink.log(m, run.state.global_step)
    if run.state.global_step % run.cfg.logging.log_interval == 0 and dist.get_rank() == 0:
        log.info("step %d stage %d: reward %.3f acc %.3f len %.1f kl %.2e (%.1fs)", run.state.global_step, stage_index,
                 m["reward/mean"], m["reward/accuracy"], m["rollout/len_mean"], m["train/kl"], total)
