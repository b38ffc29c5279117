"""Cold-start SFT: packing is exact, the loss scaling gives one big batch's gradients, a short run
learns, its checkpoint exports to a transformers-loadable model, and an interrupted run resumes
exactly where an uninterrupted one would be."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from types import SimpleNamespace
import torch

from megatron_vr1.config import load_hf_arch

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "tiny_cpu_sft.yaml"
N_SFT = 40
"""Synthetic rows: 5 steps per epoch at global batch 8."""


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    from megatron_vr1.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("sft_data"), n_train=0, n_val=0, n_test=0, n_sft=N_SFT).sft


def _examples(tiny_hf, sft_data, n: int):
    from megatron_vr1.data.sft_dataset import SFTRow, encode_sft, load_sft_rows
    from megatron_vr1.hf_processor import load_processor

    processor = load_processor(tiny_hf)
    rows = load_sft_rows(sft_data)[:n]
    text_only = SFTRow(messages=[{"role": "user", "content": "How many red shapes are there?"},
                                 {"role": "assistant", "content": "<think>No picture.</think><answer>0</answer>"}],
                       images=[])
    out = [encode_sft(r, processor, 512) for r in rows]
    return out[:1] + [encode_sft(text_only, processor, 512)] + out[1:], processor.tokenizer.pad_token_id


def _model(tiny_hf, tiny_mcore):
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    m = build_model(load_hf_arch(tiny_hf), ModelOptions(freeze_vision=True), parallel_output=False)
    load_weights(m, tiny_mcore)
    return m


# ----------------------------------------------------------------------------- in process


def test_lr_schedule_and_data_order():
    from megatron_vr1.sft.loop import lr_at, step_rows, total_steps, warmup_steps

    assert total_steps(2000, 32, 2) == 126 and warmup_steps(126, 0.15) == 19
    assert [lr_at(s, 10, 1.0, 4, "constant") for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = [lr_at(s, 10, 1.0, 2, "cosine") for s in range(1, 11)]
    assert cos[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in zip(cos[2:], cos[3:])) and cos[-1] > 0
    assert cos[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    epoch = [i for s in range(1, 6) for i in step_rows(37, 8, 3, s)]  # 5 steps, the last one short
    assert sorted(epoch) == list(range(37)) and len(step_rows(37, 8, 3, 5)) == 5
    assert epoch != list(range(37)) and [i for s in range(1, 6) for i in step_rows(37, 8, 3, s)] == epoch
    assert step_rows(37, 8, 3, 6) != step_rows(37, 8, 3, 1)  # a new shuffle each epoch


def test_packed_row_equals_separate_examples(tiny_hf, tiny_mcore, sft_data, single_rank):
    """Two image examples and a text-only one packed into one row (plus padding) give the same
    per-token logprobs on the assistant tokens as each run on its own: the block-diagonal mask,
    per-example rope positions, image order and the shifted loss mask are right."""
    from megatron_vr1.models.qwen25_vl.io import make_inputs
    from megatron_vr1.rl.grpo import token_logprobs
    from megatron_vr1.sft.loop import pack_rows

    arch = load_hf_arch(tiny_hf)
    model = _model(tiny_hf, tiny_mcore).eval()
    examples, pad = _examples(tiny_hf, sft_data, 2)
    assert examples[1].pixel_values is None and examples[0].num_tokens != examples[2].num_tokens

    def logp(inp):
        with torch.no_grad():
            return token_logprobs(model(inp)[:, :-1], inp.input_ids_BS[:, 1:], vocab_size=arch.text.vocab_size)

    separate, nll_separate = [], 0.0
    for ex in examples:
        inp = make_inputs(arch, torch.tensor([ex.input_ids]), None, ex.pixel_values, ex.image_grid_thw)
        mask = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
        lp = logp(inp)[0][mask]
        separate.append(lp)
        nll_separate += float(-lp.sum())
    total = sum(e.num_tokens for e in examples)
    mb = pack_rows([examples], arch, pad, seq_len=total + 7)
    assert mb.inputs.attention_mask.shape == (1, 1, total + 7, total + 7) and mb.tokens == total
    assert mb.loss_mask_BT.sum() == sum(sum(e.loss_mask[1:]) for e in examples)
    packed = logp(mb.inputs)[0][mb.loss_mask_BT[0].bool()]
    torch.testing.assert_close(packed, torch.cat(separate), atol=1e-5, rtol=0)
    n = len(packed)
    assert float(-packed.sum()) / n == pytest.approx(nll_separate / n, abs=1e-5)  # the token-mean loss
    # the positions restart at 0 for every example
    starts = [0, examples[0].num_tokens, examples[0].num_tokens + examples[1].num_tokens]
    assert all(int(mb.inputs.position_ids_3BS[:, 0, s].abs().max()) == 0 for s in starts)
    # without packing (attention that honours only the causal mask): one right-padded example a row
    from megatron_vr1.sft.loop import micro_batches

    (unpacked,) = micro_batches(examples, arch, 10_000, 3, pad, pack=False)
    assert unpacked.inputs.input_ids_BS.shape == (3, max(e.num_tokens for e in examples))
    assert [int(r.sum()) for r in unpacked.loss_mask_BT] == [sum(e.loss_mask[1:]) for e in examples]
    torch.testing.assert_close(logp(unpacked.inputs)[unpacked.loss_mask_BT.bool()], torch.cat(separate),
                               atol=1e-5, rtol=0)


def test_micro_batch_split_gives_the_same_step(tiny_hf, tiny_mcore, sft_data, single_rank):
    """The loss scaling: one step over 4 packed rows as 4 micro-batches of 1 row, or 2 of 2, gives
    the same global token-mean loss and gradient norm."""
    from megatron_vr1.config import OptimConfig
    from megatron_vr1.sft.loop import micro_batches, sft_loss_fn
    from megatron_vr1.trainer.core import build_optimizer, optimizer_step, wrap_ddp

    arch = load_hf_arch(tiny_hf)
    examples, pad = _examples(tiny_hf, sft_data, 7)
    model = _model(tiny_hf, tiny_mcore)
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3))
    for g in opt.param_groups:
        g["lr"] = 0.0  # AdamW with lr 0 leaves the weights as they are
    results = []
    for mbs_size in (1, 2):
        mbs = micro_batches(examples, arch, 260, mbs_size, pad)
        assert sum(mb.inputs.input_ids_BS.shape[0] for mb in mbs) == 4 and len(mbs) == 4 // mbs_size
        tokens = float(sum(mb.loss_mask_BT.sum() for mb in mbs))
        out = optimizer_step(ddp, opt, mbs, sft_loss_fn(arch, tokens), max(mb.inputs.input_ids_BS.shape[1] for mb in mbs),
                             n_sums=1)
        results.append(SimpleNamespace(loss=float(out.sums[0]) / tokens, grad_norm=out.grad_norm))
    (a, b) = results
    assert a.loss == pytest.approx(b.loss, abs=1e-6) and a.loss > 4
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)


# ----------------------------------------------------------------------------- end to end (CLI)


def _sft(run_dir: Path, tiny_hf, tiny_mcore, sft_data, *extra: str) -> subprocess.Popen:
    overrides = [f"model.hf_path={tiny_hf}", f"model.mcore_path={tiny_mcore}", f"sft.data_path={sft_data}",
                 f"sft.image_root={sft_data.parent}", f"run_dir={run_dir}", "sft.global_batch_size=8",
                 "sft.epochs=3", "sft.max_length=256", "optim.lr=3e-3", "optim.warmup_ratio=0.1",
                 "checkpoint.save_interval=5", "checkpoint.keep_last=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-m", "megatron_vr1.cli", "sft", str(RECIPE), *overrides, *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-6000:]
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_runs(tiny_hf, tiny_mcore, sft_data, tmp_path_factory):
    """15 steps (3 epochs x 5) uninterrupted, and the same run stopped after step 7 then resumed;
    the uninterrupted one runs alongside (one thread each)."""
    root = tmp_path_factory.mktemp("sft_runs")
    whole, split = root / "whole", root / "split"
    p_whole = _sft(whole, tiny_hf, tiny_mcore, sft_data)
    first = _wait(_sft(split, tiny_hf, tiny_mcore, sft_data, "--stop-after-step", "7"))
    after_first = _metrics(split)
    second = _wait(_sft(split, tiny_hf, tiny_mcore, sft_data))
    _wait(p_whole)
    return dict(whole=whole, split=split, first=first, second=second, after_first=after_first)


def test_short_run_learns_and_logs(sft_runs):
    m = _metrics(sft_runs["whole"])
    assert [r["step"] for r in m] == list(range(1, 16))
    loss = [r["sft/loss"] for r in m]
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    assert last < first - 1.0, loss
    for key in ("sft/lr", "sft/grad_norm", "sft/tokens", "sft/loss_tokens", "perf/seconds_per_step"):
        assert all(key in r and r[key] > 0 for r in m), key
    assert m[0]["sft/lr"] == pytest.approx(3e-3 / 2) and m[-1]["sft/lr"] == pytest.approx(3e-3)
    assert sum(r["sft/examples"] for r in m) == 3 * N_SFT
    assert (sft_runs["whole"] / "config.yaml").exists()


def test_resume_continues_and_matches_uninterrupted(sft_runs):
    split, whole = sft_runs["split"], sft_runs["whole"]
    assert [r["step"] for r in sft_runs["after_first"]] == list(range(1, 8))
    assert sft_runs["first"].strip().endswith("sft_step_000007")
    assert "resumed from" in sft_runs["second"] and "at step 7 of 15" in sft_runs["second"]
    m = _metrics(split)
    assert [r["step"] for r in m] == list(range(1, 16))  # continued at 8, not restarted
    ref = {r["step"]: r["sft/loss"] for r in _metrics(whole)}
    for r in m:
        assert r["sft/loss"] == pytest.approx(ref[r["step"]], rel=1e-5, abs=1e-6), r["step"]
    ckpts = sorted(p.name for p in (split / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["latest", "sft_final", "sft_step_000005", "sft_step_000007", "sft_step_000010",
                     "sft_step_000015"]


def test_final_checkpoint_exports_and_loads(sft_runs, tiny_hf, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from checkpoints_conv.convert import mcore_to_hf

    final = sft_runs["whole"] / "checkpoints" / "sft_final"
    assert (sft_runs["whole"] / "checkpoints" / "latest").read_text().strip() == "sft_final"
    out = tmp_path / "hf"
    mcore_to_hf(final, out, progress=False)
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf).state_dict()
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    vision = [k for k in before if "visual" in k]
    lm = [k for k in before if "visual" not in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen
    assert all(not torch.equal(before[k], after[k]) for k in lm)  # trained
