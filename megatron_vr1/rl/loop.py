"""GRPO with PTST: the training loop. `train()` reads as the algorithm; the pieces follow it.

Per step: rollout (vLLM) -> reward (HFRRF) -> group advantages -> old/ref logprobs (Megatron,
forward only) -> policy update (mini-batches x epochs) -> resync the engine -> log, eval, save.
PTST stages (ptst.stages) change the response-length cap and the group size; each stage ends
with a checkpoint, and a run resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist


if TYPE_CHECKING:
    from megatron_vr1.config import Config, HFArch
    from megatron_vr1.data.rl_dataset import PromptSampler, RLRow
    from megatron_vr1.models.qwen25_vl.model import Qwen25VLModel
    from megatron_vr1.rollout.vllm_engine import VLLMEngine
    from megatron_vr1.trainer.core import TrainerSession

log = logging.getLogger("megatron_vr1.rl")


@dataclass
class LoopState:
    stage: int = 0
    step_in_stage: int = 0
    global_step: int = 0
    sampler: dict = field(default_factory=dict)
    best_val: float = -1.0
    """Best validation accuracy so far; its checkpoint is `checkpoints/best`."""


@dataclass(kw_only=True)
class RLRun:
    """Everything one RL run holds."""

    cfg: "Config"
    arch: "HFArch"
    session: "TrainerSession"
    """Process groups, the DDP-wrapped policy, optimizer, checkpoints, metrics sink."""
    ref: Optional["Qwen25VLModel"]
    """Frozen reference policy (None when grpo.kl_beta == 0)."""
    engine: Optional["VLLMEngine"]
    """This rank's shard of its rollout-engine replica (rollout/replicas.py): every rank generates."""
    processor: Any
    sampler: "PromptSampler"
    val_rows: list["RLRow"]
    state: LoopState

    @property
    def model(self):
        """The DDP-wrapped policy."""
        return self.session.ddp

    @property
    def optimizer(self):
        return self.session.optimizer

    @property
    def run_dir(self) -> Path:
        return self.session.run_dir

    @property
    def sink(self):
        return self.session.sink


# ----------------------------------------------------------------------------- the algorithm


def train(cfg, arch, start_stage: int = 0) -> Path:
    from megatron_vr1 import preemption
    from megatron_vr1.monitoring.progress import Progress

    stop = preemption.install()  # SIGUSR1 (time limit) / SIGTERM: save after this step, exit for a requeue
    run = setup(cfg, arch, start_stage)
    stages = [s for s in cfg.ptst.stages if s.enabled]
    progress = Progress(sum(s.steps for s in stages), "rl step", start=run.state.global_step,
                        enabled=dist.get_rank() == 0)
    for stage_index in range(run.state.stage, len(stages)):
        stage = stages[stage_index]
        while run.state.step_in_stage < stage.steps:
            set_lr(run, rl_lr(cfg, stages, stage, run.state.global_step + 1))
            t = Timer()
            with profiled(run, run.state.global_step + 1):
                with t("rollout"):
                    scored, sampling = rollout_batch(run, stage)
                sleep_engine(run)  # GPU: the engine frees its memory while the trainer computes
                with t("logprobs"):
                    batches, seq_len = prepare_batches(run, scored)
                with t("update"):
                    update = policy_updates(run, batches, seq_len)
                with t("resync"):
                    wake_engine(run)
                    resync(run)
            run.state.step_in_stage += 1
            run.state.global_step += 1
            m = log_step(run, stage_index, stage, scored, batches, update, t, sampling)
            progress.update(run.state.global_step, progress_fields(m, stage_index, len(stages)))
            maybe_eval(run, stage)
            stopping = stop.requested() and run.state.step_in_stage < stage.steps  # agreed by all ranks
            if stopping or (run.state.step_in_stage % cfg.checkpoint.save_interval == 0
                            and run.state.step_in_stage < stage.steps):
                save(run, f"stage{stage_index}_step{run.state.step_in_stage:05d}")
            if stopping:
                finish(run)
                progress.close()
                preemption.exit_preempted()
        run.state.stage, run.state.step_in_stage = stage_index + 1, 0
        save(run, f"stage{stage_index}_end")
        if stop.requested() and stage_index + 1 < len(stages):
            finish(run)
            progress.close()
            preemption.exit_preempted()
    finish(run)
    progress.close()
    return run.run_dir


# ----------------------------------------------------------------------------- set-up


def setup(cfg, arch, start_stage: int = 0) -> RLRun:
    from megatron_vr1.checkpointing import latest_checkpoint
    from megatron_vr1.data.rl_dataset import PromptSampler, load_rl_rows
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.models.qwen25_vl.io import model_checkpoint_dir
    from megatron_vr1.rollout.vllm_engine import VLLMEngine
    from megatron_vr1.trainer.core import TrainerSession

    # everything a user can get wrong is checked before anything is built
    if cfg.model.mcore_path is None:
        raise ValueError("model.mcore_path is not set: point it at the cold-start checkpoint "
                         "(megatron-vr1 sft ...) or a converted one (megatron-vr1 convert hf-to-mcore ...)")
    if not (model_checkpoint_dir(cfg.model.mcore_path) / "metadata.json").exists():
        raise FileNotFoundError(
            f"model.mcore_path {cfg.model.mcore_path} is not a Megatron checkpoint (no model/metadata.json); "
            "give the cold-start checkpoint (<sft run>/checkpoints/sft_final) or a converted one "
            f"(megatron-vr1 convert hf-to-mcore --hf {cfg.model.hf_path} --out <folder>)")
    if cfg.data.train_path is None:
        raise ValueError("data.train_path is not set: a parquet in the Vision-R1-rl schema (images, problem, answer)")
    rows = load_rl_rows(cfg.data.train_path)  # bad rows are counted and skipped before any model is built
    val_rows = load_rl_rows(cfg.data.val_path) if cfg.data.val_path else []
    ckpt = latest_checkpoint(Path(cfg.run_dir))

    session = TrainerSession.open(cfg, arch, resume=ckpt, with_ref=cfg.grpo.kl_beta > 0)
    sampler = PromptSampler(rows, cfg.rollout.prompts_per_step, seed=cfg.seed)
    state = LoopState(stage=start_stage)
    if session.resumed_state is not None:
        state = LoopState(**session.resumed_state)
        sampler.load_state_dict(state.sampler)
        log.info("resumed from %s (stage %d, step %d)", ckpt, state.stage, state.step_in_stage)
    # Every rank is a shard of one engine replica (rollout/replicas.py): world / rollout TP replicas
    # of rollout-TP consecutive ranks (external_launcher whenever the world has more than one rank),
    # and every replica generates its share of each step's prompts.
    from megatron_vr1.rollout.layout import check_rollout_tp, check_world, rollout_tp

    tp = rollout_tp(cfg)
    check_rollout_tp(arch, tp)
    check_world(dist.get_world_size() if dist.is_initialized() else 1, tp)
    max_len = max(s.max_response_length for s in cfg.ptst.stages if s.enabled) + cfg.data.max_prompt_length
    kv = int(cfg.rollout.kv_cache_gib * 2**30) if cfg.rollout.kv_cache_gib else None
    engine = VLLMEngine(cfg.model.hf_path, arch, dtype=cfg.model.params_dtype, max_model_len=max_len,
                        kv_cache_bytes=kv, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                        seed=cfg.seed, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                        tensor_parallel_size=tp, compile=cfg.rollout.compile)
    run = RLRun(cfg=cfg, arch=arch, session=session, ref=session.ref, engine=engine,
                processor=load_processor(cfg.model.hf_path, min_pixels=cfg.data.min_pixels,
                                         max_pixels=cfg.data.max_pixels),
                sampler=sampler, val_rows=val_rows, state=state)
    resync(run, full=True)  # the engine starts from the HF weights; the policy may be the cold-start checkpoint
    if state.global_step == 0:  # the cold start is the first candidate for `best`
        stages = [s for s in cfg.ptst.stages if s.enabled]
        maybe_eval(run, stages[min(state.stage, len(stages) - 1)])
    return run


# ----------------------------------------------------------------------------- the steps


def rollout_batch(run: RLRun, stage):
    """This step's scored rollouts for this data-parallel replica's share of the prompts.

    With `grpo.dynamic_sampling`, groups whose rewards are all equal (zero advantage: no gradient)
    are set aside and more prompts are drawn, up to `grpo.max_resample_rounds` extra rounds; the
    step keeps its size (the informative groups first, then set-aside ones if too few were found),
    so every replica trains the same number of micro-batches. Every rank runs the same number of
    rounds (agreed by an all-reduce)."""
    from megatron_vr1.rl.grpo import informative_groups

    g = run.cfg.grpo
    rows = this_replicas_share(run.sampler.next_batch())
    scored = score(run, rows, generate(run, rows, stage), stage)
    info = {"rounds": 0, "informative_frac": 1.0}
    if not g.dynamic_sampling:
        return scored, info
    G, wanted = stage.group_size, len(rows)

    def split(batch):
        keep = informative_groups(torch.tensor([s.reward for s in batch]), G).tolist()
        groups = [batch[i * G:(i + 1) * G] for i in range(len(keep))]
        return [x for x, k in zip(groups, keep) if k], [x for x, k in zip(groups, keep) if not k]

    good, flat = split(scored)
    info["informative_frac"] = len(good) / max(1, wanted)
    while info["rounds"] < g.max_resample_rounds and _any_rank(len(good) < wanted):
        info["rounds"] += 1
        more = this_replicas_share(run.sampler.next_batch())
        new_good, new_flat = split(score(run, more, generate(run, more, stage, round_=info["rounds"]), stage))
        good += new_good
        flat += new_flat
    chosen = (good + flat)[:wanted]
    return [s for grp in chosen for s in grp], info


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sleep_engine(run: RLRun) -> None:
    """The engine releases its weights and KV cache while the trainer runs (GPU sleep mode; a no-op
    on CPU, where vLLM has none)."""
    if run.engine is not None:
        run.engine.sleep()


def wake_engine(run: RLRun) -> None:
    if run.engine is not None:
        run.engine.wake_up()


def generate(run: RLRun, rows, stage, round_: int = 0):
    """The rollout groups of `rows` (this rank's training share, from `this_replicas_share`). Every
    engine replica generates its slice of the step's whole batch and the groups are gathered, so
    every rank (data-parallel and pipeline ranks too) generates and receives what it trains on
    (rollout/replicas.py). All ranks call this together."""
    from megatron_vr1.data.rl_dataset import build_prompt
    from megatron_vr1.rollout.engine import SamplingSettings
    from megatron_vr1.rollout.replicas import generate_groups

    full = getattr(rows, "full", rows)
    wanted = getattr(rows, "indices", range(len(rows)))
    sampling = SamplingSettings(n=stage.group_size, max_tokens=stage.max_response_length,
                                temperature=run.cfg.rollout.temperature, top_p=run.cfg.rollout.top_p,
                                seed=run.cfg.seed * 1_000_003 + run.state.global_step + 7919 * round_)
    return generate_groups(run.engine, len(full),
                           lambda i: build_prompt(full[i], run.processor, run.cfg.data.system_prompt),
                           sampling, list(wanted))


def this_replicas_share(rows):
    """Each data-parallel rank trains on its own slice of the step's prompts (`d, d+dp, ...`, the same
    split at every layout); the share remembers the whole batch, which the engine replicas split
    among themselves in `generate`."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.rollout.replicas import PromptShare

    return PromptShare(rows, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def score(run: RLRun, rows, groups, stage):
    """Rewards (plus the soft overlong penalty when grpo.overlong_buffer > 0) and group advantages."""
    from megatron_vr1.rewards import score_batch
    from megatron_vr1.rl.batch import ScoredRollout
    from megatron_vr1.rl.grpo import group_advantages, overlong_penalty

    g = run.cfg.grpo
    flat = [r for grp in groups for r in grp]
    truths = [rows[r.prompt_index].answer for r in flat]
    results = score_batch([r.response_text for r in flat], truths, reward=g.reward)
    rewards = torch.tensor([x.reward for x in results], dtype=torch.float64)
    if g.overlong_buffer > 0:
        lengths = torch.tensor([len(r.response_ids) for r in flat], dtype=torch.float64)
        rewards = rewards + overlong_penalty(lengths, stage.max_response_length, g.overlong_buffer,
                                             g.overlong_penalty).double()
    adv = group_advantages(rewards, stage.group_size, scale="none" if g.advantage == "drgrpo" else "std", eps=g.adv_eps)
    return [ScoredRollout(r, float(rw), x.correct, x.format_ok, float(a))
            for r, x, rw, a in zip(flat, results, rewards.tolist(), adv)]


def prepare_batches(run: RLRun, scored):
    """Micro-batches (rl/batch.py: packed rows, one optimizer step per mini-batch) with the
    trainer's own old logprobs (and the reference's).

    No redundant passes: with one epoch per rollout, the first mini-batch is scored by the very
    policy the update starts from, so its old logprobs are left to the update itself (None here);
    only the later mini-batches (the policy has moved by then) get a forward pass now."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.platform import device_mode_suspended
    from megatron_vr1.rl.batch import collate
    from megatron_vr1.trainer.forward import sequence_logprobs, with_image_features

    cfg = run.cfg
    if cfg.grpo.mask_truncated:  # a truncated response gets no loss at all
        for s in scored:
            s.trained = s.rollout.finish_reason != "length"
    model = run.model.module
    with device_mode_suspended():  # host-side tensor building: no CUDA device asked for
        batches, seq_len = collate(
            scored, run.processor, run.arch, run.processor.tokenizer.pad_token_id, n_steps=optimizer_steps(run),
            micro_batch_size=cfg.parallel.micro_batch_size, max_tokens=cfg.parallel.max_tokens_per_microbatch,
            pack=cfg.parallel.rl_packing and not model.causal_mask_only, share_prompts=cfg.parallel.rl_share_prompts,
            same_shape=ps.get_pipeline_model_parallel_world_size() > 1)
    temp = cfg.rollout.temperature
    for mb in batches:
        if cfg.model.freeze_vision:  # the tower runs once per micro-batch, not once per pass
            mb.inputs = with_image_features(model, mb.inputs)
        if mb.step == 0 and cfg.grpo.epochs_per_rollout == 1:
            mb.old_logp_BT = None
        else:
            mb.old_logp_BT = mb.unpack(sequence_logprobs(model, run.arch, mb.inputs, temperature=temp)) * mb.loss_mask_BT
        if run.ref is not None:
            mb.ref_logp_BT = mb.unpack(sequence_logprobs(run.ref, run.arch, mb.inputs, temperature=temp)) * mb.loss_mask_BT
    return batches, seq_len


def optimizer_steps(run: RLRun) -> int:
    """Optimizer steps per rollout batch (per epoch): the step's prompts over `grpo.minibatch_prompts`."""
    return max(1, math.ceil(run.cfg.rollout.prompts_per_step / max(1, run.cfg.grpo.minibatch_prompts)))


def policy_updates(run: RLRun, batches, seq_len):
    """`grpo.epochs_per_rollout` passes over the rollout batch in mini-batches of
    `grpo.minibatch_prompts` prompts (x group size), one optimizer step each. Returns one
    UpdateMetrics per optimizer step (the first epoch's carry the trainer-vs-engine mismatch)."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.rl.update import LossSettings, policy_update

    g = run.cfg.grpo
    loss = LossSettings(clip_low=g.clip_low, clip_high=g.clip_high, kl_beta=g.kl_beta, agg=g.loss_agg,
                        tis_cap=g.tis_cap, temperature=run.cfg.rollout.temperature,
                        kl_estimator=g.kl_estimator, entropy_coef=g.entropy_coef)
    steps = sorted({mb.step for mb in batches})
    results = []
    for epoch in range(g.epochs_per_rollout):
        for step in steps:
            mbs = [mb for mb in batches if mb.step == step]
            counts = torch.tensor([float(sum(mb.loss_mask_BT.sum() for mb in mbs)),
                                   float(sum(mb.loss_mask_BT.shape[0] for mb in mbs))], dtype=torch.float64)
            if ps.get_data_parallel_world_size() > 1:  # the global batch spans the replicas
                dist.all_reduce(counts, group=ps.get_data_parallel_group())
            tokens, seqs = counts.tolist()
            if tokens == 0:
                continue
            u = policy_update(run.model, run.optimizer, mbs, run.arch, loss, tokens, seqs, seq_len)
            u.extra["epoch"] = epoch
            results.append(u)
    return results


def resync(run: RLRun, full: bool = False) -> None:
    """Push the policy's weights into the engine (a frozen vision tower only when `full`)."""
    from megatron_vr1.rollout.resync import hf_buckets

    buckets = hf_buckets(run.model.module, run.arch, include_vision=full or not run.cfg.model.freeze_vision)
    # every rank feeds its engine shard the full HF tensors; vLLM's loaders take the shard's slice
    if run.engine is not None:
        run.engine.update_weights(buckets)
    else:
        for _ in buckets:  # collectives: every rank takes part
            pass


def evaluate(run: RLRun, max_tokens: int) -> Optional[float]:
    """Greedy accuracy (HFRRF reward 1) on the validation rows: each engine replica generates its
    slice, every rank gets all of them (all ranks call this together)."""
    from megatron_vr1.data.rl_dataset import build_prompt
    from megatron_vr1.quick_eval import greedy_scores
    from megatron_vr1.rollout.engine import SamplingSettings
    from megatron_vr1.rollout.replicas import generate_groups

    if not run.val_rows or run.engine is None:
        return None
    rows = run.val_rows
    groups = generate_groups(run.engine, len(rows), lambda i: build_prompt(rows[i], run.processor,
                                                                           run.cfg.data.system_prompt),
                             SamplingSettings(n=1, max_tokens=max_tokens, temperature=0.0), range(len(rows)))
    m = greedy_scores(groups, rows)
    run.sink.log({"eval/accuracy": m["accuracy"], "eval/len_mean": m["len_mean"]}, run.state.global_step)
    return float(m["accuracy"])


def maybe_eval(run: RLRun, stage) -> None:
    """Validation accuracy every `logging.val_interval` steps; the best policy is kept as
    `checkpoints/best` (model selection on the validation split, never on the test set)."""
    n = run.cfg.logging.val_interval
    if not (n and run.state.global_step % n == 0):
        return
    box = [evaluate(run, stage.max_response_length)]  # every rank: the engine replicas generate together
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
    run.session.set_lr(lr)


def save(run: RLRun, tag: str, update_latest: bool = True) -> None:
    run.state.sampler = run.sampler.state_dict()
    run.session.save(tag, vars(run.state).copy(), update_latest=update_latest)


def finish(run: RLRun) -> None:
    run.session.close()


# ----------------------------------------------------------------------------- metrics


@contextlib.contextmanager
def profiled(run: RLRun, step: int):
    """torch.profiler around global step `step` when it is `logging.profile_step` (rank 0 writes
    the operator table and a Chrome trace into the run folder); otherwise nothing."""
    if step != run.cfg.logging.profile_step:
        yield
        return
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=False) as prof:
        with record_function(f"rl_step_{step}"):
            yield
    if dist.get_rank() == 0:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (run.run_dir / f"profile_step{step}.txt").write_text(table + "\n")
        prof.export_chrome_trace(str(run.run_dir / f"profile_step{step}.json"))
        log.info("profile of step %d: %s", step, run.run_dir / f"profile_step{step}.txt")


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


def log_step(run: RLRun, stage_index, stage, scored, batches, updates, t: Timer, sampling: dict) -> dict:
    """The step's metrics; written to the sinks every `logging.log_interval` steps and at the last
    step of a stage. Returns them (for the progress line)."""
    lens = np.array([len(s.rollout.response_ids) for s in scored])
    first = [u for u in updates if u.extra.get("epoch", 0) == 0]
    n_mm = sum(u.mismatch_tokens for u in first)
    mm_mean = sum(u.mismatch_abs_sum for u in first) / n_mm if n_mm else 0.0
    mm_mult = sum(u.mismatch_exp_sum for u in first) / n_mm if n_mm else 1.0
    mm_max = max((u.mismatch_max for u in first), default=0.0)
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
        "mismatch/mean_abs": mm_mean, "mismatch/max_abs": mm_max, "mismatch/mult_prob_error": mm_mult,
        "ptst/stage": float(stage_index), "ptst/max_response_length": float(stage.max_response_length),
        "ptst/group_size": float(stage.group_size),
        "perf/tokens_per_s": float(lens.sum() / max(total, 1e-9)),
        "perf/step_s": total,
        **{f"perf/{k}_s": v for k, v in t.seconds.items()},
    }
    if run.cfg.grpo.dynamic_sampling:
        m["rollout/informative_frac"] = float(sampling["informative_frac"])
        m["rollout/resample_rounds"] = float(sampling["rounds"])
    if run.state.global_step % run.cfg.logging.log_interval == 0 or run.state.step_in_stage == stage.steps:
        run.sink.log(m, run.state.global_step)
    return m


def progress_fields(m: dict, stage_index: int, n_stages: int) -> dict[str, str]:
    """What the console line shows of a step's metrics."""
    return {"stage": f"{stage_index + 1}/{n_stages}", "reward": f"{m['reward/mean']:.3f}",
            "acc": f"{m['reward/accuracy']:.3f}", "len": f"{m['rollout/len_mean']:.1f}",
            "kl": f"{m['train/kl']:.2e}", "step": f"{m['perf/step_s']:.1f}s"}
