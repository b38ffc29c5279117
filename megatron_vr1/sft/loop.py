"""Cold-start SFT on Megatron-Core: packed rows, assistant-only token-mean loss, resumable.

Vision-R1's cold start (docs/method.md): full fine-tune of the language model with the
vision tower and merger frozen (`model.freeze_vision: true` in the recipe), AdamW, warmup then
constant or cosine, `sft.global_batch_size` examples per optimizer step, `sft.epochs` passes.

Per optimizer step:
- Data: the step's `global_batch_size` rows are a slice of a per-epoch shuffle (a pure function
  of `seed`, epoch and step, so a resumed run sees the same order). Each data-parallel replica
  takes every dp-th row and encodes only those (chat template, image processor, assistant loss
  mask). Encoding is lazy, per step: the real cold-start set has ~200K images. A row longer than
  `sft.max_length` tokens is skipped and counted (`sft/skipped`), never truncated.
- Packing: a replica's examples are packed first-fit-decreasing into rows of at most
  `sft.max_length` tokens. A packed row is ONE sequence: the examples' tokens concatenated, a
  block-diagonal causal mask (causal within an example, nothing across examples), each example's
  own 3D rope positions (`get_rope_index` per example, so every example starts at position 0),
  its images' `pixel_values` / `image_grid_thw` in order, and its loss mask moved to target
  positions (target t+1 of position t; the last token of an example predicts nothing). A packed
  row therefore gives exactly the losses of its examples run one by one (tests/test_sft.py).
- Micro-batches: `parallel.micro_batch_size` packed rows each, right-padded to a common length
  (padding is its own segment, loss 0); with pipeline parallelism every micro-batch of the step
  has the same length, as the p2p shapes require.
- Loss: cross-entropy summed over the assistant tokens of the micro-batch divided by the
  assistant tokens of the whole global batch (over all replicas), times num_microbatches * dp
  (megatron-core divides by the first, DDP averages over the second), exactly as
  the RL update (both go through `trainer.core.optimizer_step`): the gradients are those of one big batch's token-mean.
- LR: set on every optimizer param group before the step (`lr_at`): linear warmup from 0 over
  ceil(warmup_ratio * total steps) steps, then constant or cosine to 0.

Checkpoints (`megatron_vr1.checkpointing`): `sft_step_NNNNNN` (model + optimizer + RNG + loop
state) every `checkpoint.save_interval` steps and at the end; then `sft_final`, model only (the
RL recipe's `model.mcore_path`, and a `convert mcore-to-hf` input). A run resumes from the newest
`sft_step_*` checkpoint in its run folder and continues at the next step.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_vr1.schedule import lr_at, warmup_steps  # noqa: F401  (lr_at: also imported from here)

log = logging.getLogger("megatron_vr1.sft")

FINAL_TAG = "sft_final"
STEP_PREFIX = "sft_step_"


def step_tag(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


# ----------------------------------------------------------------------------- schedule and data order


def total_steps(n_rows: int, global_batch_size: int, epochs: int) -> int:
    """Optimizer steps of a run: epochs * ceil(rows / global batch) (the last batch of an epoch may be short)."""
    return epochs * math.ceil(n_rows / global_batch_size)


@functools.lru_cache(maxsize=2)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_rows))
    random.Random(f"megatron-vr1-sft:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def step_rows(n_rows: int, global_batch_size: int, seed: int, step: int) -> list[int]:
    """Row indices of optimizer step `step` (1-based): a slice of the epoch's shuffle."""
    per_epoch = math.ceil(n_rows / global_batch_size)
    epoch, b = divmod(step - 1, per_epoch)
    return list(_epoch_order(n_rows, seed, epoch)[b * global_batch_size:(b + 1) * global_batch_size])


# ----------------------------------------------------------------------------- packing


@dataclass
class PackedMicroBatch:
    """Packed rows of one micro-batch. B rows of S tokens; T = S - 1 target positions."""

    inputs: "VLInputs"  # noqa: F821
    loss_mask_BT: torch.Tensor
    """float, 1 where target t+1 is an assistant token of the same example as position t."""
    tokens: int
    """Real (non-padding) tokens."""
    examples: int


def pack_rows(rows: Sequence[Sequence["SFTExample"]], arch, pad_id: int,  # noqa: F821
              seq_len: Optional[int] = None) -> PackedMicroBatch:
    """One micro-batch from packed rows (each a list of examples), right-padded to `seq_len`
    (default: the longest row)."""
    from megatron_vr1.models.qwen25_vl.model import VLInputs
    from megatron_vr1.models.qwen25_vl.rope_index import get_rope_index

    lengths = [sum(e.num_tokens for e in row) for row in rows]
    S = max(lengths) if seq_len is None else seq_len
    if S < max(lengths):
        raise ValueError(f"seq_len {S} is shorter than the longest packed row ({max(lengths)} tokens)")
    S = max(S, 2)
    B = len(rows)
    ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    pos_3BS = torch.zeros(3, B, S, dtype=torch.long)
    seg_BS = torch.full((B, S), -1, dtype=torch.long)  # padding: a segment of its own
    loss_BT = torch.zeros(B, S - 1)
    pixels, grids = [], []
    for b, row in enumerate(rows):
        o = 0
        for k, ex in enumerate(row):
            n = ex.num_tokens
            ids = torch.tensor(ex.input_ids, dtype=torch.long)
            ids_BS[b, o:o + n] = ids
            pos, _ = get_rope_index(ids[None], ex.image_grid_thw, image_token_id=arch.image_token_id,
                                    spatial_merge_size=arch.vision.spatial_merge_size,
                                    video_token_id=arch.video_token_id)
            pos_3BS[:, b, o:o + n] = pos[:, 0]
            seg_BS[b, o:o + n] = k
            # position o+i predicts token o+i+1: its weight is the mask of token i+1 of this example
            loss_BT[b, o:o + n - 1] = torch.tensor(ex.loss_mask[1:], dtype=torch.float32)
            if ex.pixel_values is not None:
                pixels.append(ex.pixel_values)
                grids.append(ex.image_grid_thw)
            o += n
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    mask = causal[None] | (seg_BS[:, :, None] != seg_BS[:, None, :])
    inputs = VLInputs(
        input_ids_BS=ids_BS,
        position_ids_3BS=pos_3BS,
        attention_mask=mask[:, None],
        pixel_values_PC=torch.cat(pixels) if pixels else None,
        image_grid_thw_N3=torch.cat(grids) if grids else None,
    )
    return PackedMicroBatch(inputs, loss_BT, sum(lengths), sum(len(r) for r in rows))


def micro_batches(examples: Sequence["SFTExample"], arch, max_length: int, micro_batch_size: int,  # noqa: F821
                  pad_id: int, same_length: bool = False, multiple_of: int = 1,
                  pack: bool = True) -> list[PackedMicroBatch]:
    """Pack `examples` into rows of <= max_length tokens, then group the rows `micro_batch_size`
    at a time. `same_length`: every micro-batch padded to the longest row and full-sized (padding
    rows), as pipeline parallelism needs; lengths are rounded up to `multiple_of`. `pack=False`:
    one example per row (for attention that honours only the causal mask)."""
    from megatron_vr1.data.sft_dataset import pack_examples

    def round_up(n: int) -> int:
        return -(-n // multiple_of) * multiple_of

    if not examples:  # nothing for this replica: one all-padding row keeps the collectives in step
        return [pack_rows([[]], arch, pad_id, seq_len=round_up(2))]
    rows = pack_examples(examples, max_length) if pack else [[e] for e in examples]
    groups = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    longest = max(sum(e.num_tokens for e in r) for r in rows)
    out = []
    for g in groups:
        if same_length:
            g = g + [[]] * (micro_batch_size - len(g))
            seq_len = round_up(longest)
        else:
            seq_len = round_up(max(sum(e.num_tokens for e in r) for r in g))
        out.append(pack_rows(g, arch, pad_id, seq_len=seq_len))
    return out


# ----------------------------------------------------------------------------- one optimizer step


def sft_loss_fn(arch, global_loss_tokens: float):
    """The SFT loss for `trainer.core.optimizer_step`: cross-entropy over the assistant tokens,
    as this micro-batch's share of the global batch's token mean."""
    from megatron_vr1.trainer.logprobs import tp_group, vocab_parallel_logprobs

    group = tp_group()  # logits stay split over the vocabulary (parallel_output model)

    def loss_fn(mb: PackedMicroBatch, output: torch.Tensor):
        mask = mb.loss_mask_BT.to(output.device)
        logp = vocab_parallel_logprobs(output[:, :-1], mb.inputs.input_ids_BS[:, 1:].to(output.device),
                                       vocab_size=arch.text.vocab_size, group=group)
        nll = -(logp * mask).sum()
        return nll / global_loss_tokens, nll.detach().reshape(1), torch.zeros(0)

    return loss_fn


# ----------------------------------------------------------------------------- the run


def _resume_point(run_dir: Path) -> Optional[Path]:
    """The newest complete `sft_step_*` checkpoint (`latest` may name the model-only sft_final)."""
    from megatron_vr1.checkpointing import is_complete, latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None or latest.name.startswith(STEP_PREFIX):
        return latest
    steps = sorted(p for p in (run_dir / "checkpoints").glob(f"{STEP_PREFIX}*") if is_complete(p))
    return steps[-1] if steps else None


class _Encoder:
    """Encodes rows on demand; skipped rows are counted by reason and logged once per reason."""

    def __init__(self, rows, processor, max_length: int):
        self.rows, self.processor, self.max_length = rows, processor, max_length
        self.skipped: Counter = Counter()

    def __call__(self, indices: Sequence[int]):
        from megatron_vr1.data.bad_rows import BadRow
        from megatron_vr1.data.sft_dataset import encode_sft

        out = []
        for i in indices:
            row = self.rows[i]
            try:
                out.append(encode_sft(row, self.processor, self.max_length))
            except BadRow as bad:
                reason = bad.reason
                if not self.skipped[reason]:
                    log.warning("skipping SFT row %d (%s: %s); further rows skipped for this reason are only "
                                "counted (sft/skipped)", row.index, reason, bad)
                self.skipped[reason] += 1
        return out


def run_sft(cfg, arch, stop_after_step: Optional[int] = None) -> Path:
    """Cold-start SFT of `cfg.model.mcore_path` on `cfg.sft.data_path`; returns the final
    checkpoint folder (`<run_dir>/checkpoints/sft_final`).

    `stop_after_step`: end after that optimizer step (saving a resumable checkpoint) without
    changing the schedule, as an interrupted run would; returns that checkpoint's folder."""
    from megatron.core import parallel_state as ps

    from megatron_vr1 import preemption
    from megatron_vr1.data.sft_dataset import load_sft_data
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.models.qwen25_vl.io import model_checkpoint_dir
    from megatron_vr1.trainer.core import TrainerSession, device, optimizer_step

    stop = preemption.install()  # SIGUSR1 (time limit) / SIGTERM: save after this step, exit for a requeue
    s, o = cfg.sft, cfg.optim
    if s.data_path is None:
        raise ValueError("sft.data_path is not set: a cold-start JSON/JSONL file (LLaVA-CoT, Mulberry or "
                         "messages rows)")
    mcore = cfg.model.mcore_path
    if mcore is None or not (model_checkpoint_dir(mcore) / "metadata.json").exists():
        where = "model.mcore_path is not set" if mcore is None else f"model.mcore_path {mcore} is not a Megatron checkpoint"
        raise FileNotFoundError(
            f"{where}; convert the HF weights first: megatron-vr1 convert hf-to-mcore --hf {cfg.model.hf_path} "
            f"--out <folder>, and set model.mcore_path=<folder>")
    if s.max_length > arch.text.max_position_embeddings:
        raise ValueError(f"sft.max_length ({s.max_length}) exceeds max_position_embeddings "
                         f"({arch.text.max_position_embeddings}) of model.hf_path={arch.path}; lower sft.max_length")
    rows = load_sft_data(s.data_path, s.image_root).rows  # bad rows counted, logged and skipped
    total = total_steps(len(rows), s.global_batch_size, s.epochs)
    warmup = warmup_steps(total, o.warmup_ratio)
    run_dir = Path(cfg.run_dir)
    ckpt = _resume_point(run_dir)  # decided before anything is built

    session = TrainerSession.open(cfg, arch, resume=ckpt, wandb_config=cfg.to_dict())
    rank, dp, dp_rank = dist.get_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    pack = not session.policy.causal_mask_only
    if not pack:
        log.warning("Transformer Engine attention honours only the causal mask: one example per row "
                    "(no sequence packing) until THD packing lands")
    step = 0
    if session.resumed_state is not None:
        state = session.resumed_state
        step = int(state["step"])
        log.info("resumed from %s at step %d of %d", ckpt, step, total)
        if state.get("rows") != len(rows) or state.get("seed") != cfg.seed:
            log.warning("the checkpoint was trained on %s rows with seed %s, this run has %d rows and seed %d: "
                        "the data order after step %d differs from the original run's", state.get("rows"),
                        state.get("seed"), len(rows), cfg.seed, step)

    processor = load_processor(cfg.model.hf_path, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    pad_id = processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    encode = _Encoder(rows, processor, s.max_length)
    sink = session.sink
    pp = ps.get_pipeline_model_parallel_world_size()
    multiple = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    dev = device()
    if rank == 0:
        log.info("SFT: %d rows, %d steps (%d epochs x %d), warmup %d, global batch %d, dp %d",
                 len(rows), total, s.epochs, math.ceil(len(rows) / s.global_batch_size), warmup,
                 s.global_batch_size, dp)

    def save(tag: str, with_optimizer: bool = True) -> Path:
        state = {"step": step, "total_steps": total, "rows": len(rows), "seed": cfg.seed}
        return session.save(tag, state, with_optimizer=with_optimizer)

    from megatron_vr1.monitoring.progress import Progress

    progress = Progress(total, "sft step", start=step, enabled=rank == 0)
    last_saved = step
    end = total if stop_after_step is None else min(total, stop_after_step)
    stopped = False
    try:
        while step < end:
            step += 1
            t0 = time.perf_counter()
            lr = lr_at(step, total, o.lr, warmup, o.lr_schedule)
            session.set_lr(lr)
            mine = step_rows(len(rows), s.global_batch_size, cfg.seed, step)[dp_rank::dp]
            examples = encode(mine)
            t_enc = time.perf_counter() - t0
            mbs = micro_batches(examples, arch, s.max_length, cfg.parallel.micro_batch_size, pad_id,
                                same_length=pp > 1, multiple_of=multiple, pack=pack)
            counts = torch.tensor([sum(float(mb.loss_mask_BT.sum()) for mb in mbs), sum(mb.tokens for mb in mbs),
                                   len(examples), sum(mb.inputs.input_ids_BS.shape[0] for mb in mbs),
                                   sum(encode.skipped.values())], dtype=torch.float64, device=dev)
            if dp > 1:
                dist.all_reduce(counts, group=ps.get_data_parallel_group())
            loss_tokens, tokens, n_examples, n_rows, skipped = counts.tolist()
            if loss_tokens == 0:
                log.warning("step %d has no assistant tokens (all its rows were skipped); no update", step)
                continue
            seq_length = max(mb.inputs.input_ids_BS.shape[1] for mb in mbs)
            res = optimizer_step(session.ddp, session.optimizer, mbs, sft_loss_fn(arch, loss_tokens), seq_length,
                                 n_sums=1)
            loss = float(res.sums[0]) / loss_tokens
            dt = time.perf_counter() - t0
            if step % cfg.logging.log_interval == 0 or step == end:
                sink.log({"sft/loss": loss, "sft/lr": lr, "sft/grad_norm": res.grad_norm,
                          "sft/tokens": tokens, "sft/loss_tokens": loss_tokens, "sft/examples": n_examples,
                          "sft/packed_rows": n_rows, "sft/skipped": skipped,
                          "sft/epoch": (step - 1) // math.ceil(len(rows) / s.global_batch_size),
                          "perf/seconds_per_step": dt, "perf/encode_seconds": t_enc,
                          "perf/tokens_per_s": tokens / dt}, step)
            progress.update(step, {"loss": f"{loss:.4f}", "lr": f"{lr:.3g}", "grad_norm": f"{res.grad_norm:.3f}",
                                   "tokens": f"{int(tokens)}", "step": f"{dt:.2f}s"})
            if step % cfg.checkpoint.save_interval == 0 and step < total:
                save(step_tag(step))
                last_saved = step
            if stop.requested() and step < total:  # agreed by all ranks
                stopped = True
                break
        if step < total:  # stopped early on request: leave a resumable checkpoint
            ckpt = save(step_tag(step)) if last_saved != step else run_dir / "checkpoints" / step_tag(step)
            if stopped:
                preemption.exit_preempted()
            return ckpt
        if last_saved != step or not (run_dir / "checkpoints" / step_tag(step)).exists():
            save(step_tag(step))
        return save(FINAL_TAG, with_optimizer=False)
    finally:
        progress.close()
        session.close()
