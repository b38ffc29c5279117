"""GRPO math on fixed tensors, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vr1.rl.grpo import entropy, group_advantages, kl_k3, policy_loss, token_logprobs


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv = group_advantages(r, 4)
    std = math.sqrt(((0.75**2) + 3 * 0.25**2) / 3)  # unbiased std of [1,0,0,0] = 0.5
    assert std == pytest.approx(0.5)
    expected = [0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3 + [0.0] * 4  # all-equal group -> 0
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(r, 4, scale="none").tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(r, 3)


def test_first_step_on_policy_kl_zero_ratio_one_exactly():
    torch.manual_seed(0)
    logp = torch.randn(3, 5).clamp(max=-0.01)
    mask = torch.ones(3, 5)
    t = policy_loss(logp, logp.clone(), torch.tensor([1.0, -1.0, 0.5]), mask, clip_low=0.2, clip_high=0.2,
                    kl_beta=0.01, ref_logp_BT=logp.clone())
    assert t.kl.item() == 0.0 and t.ratio_mean.item() == 1.0 and t.clip_frac.item() == 0.0
    assert kl_k3(logp, logp).abs().max().item() == 0.0


def test_clipped_surrogate_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.3]]))  # ratios 1.6 and 0.6
    mask = torch.ones(1, 2)
    # positive advantage: min(1.6*1, 1.2*1) = 1.2 ; min(0.6, 0.8)=0.6 -> loss -(1.2+0.6)/2
    t = policy_loss(new, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert t.loss.item() == pytest.approx(-(1.2 + 0.6) / 2, rel=1e-6)
    assert t.clip_frac.item() == pytest.approx(0.5)  # only the 1.6 token is held by the clip
    # negative advantage: min(-1.6, -1.2) = -1.6 ; min(-0.6, -0.8) = -0.8 -> loss (1.6+0.8)/2
    t = policy_loss(new, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert t.loss.item() == pytest.approx((1.6 + 0.8) / 2, rel=1e-6)
    # clip-higher: high 0.7 lets 1.6 through for A > 0
    t = policy_loss(new, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.7)
    assert t.loss.item() == pytest.approx(-(1.6 + 0.6) / 2, rel=1e-6)


def test_token_mean_over_global_batch_sums_over_microbatches():
    torch.manual_seed(1)
    logp, old = -torch.rand(4, 6), -torch.rand(4, 6)
    mask = (torch.rand(4, 6) > 0.3).float()
    adv = torch.randn(4)
    ref = old * 1.1
    kw = dict(clip_low=0.2, clip_high=0.28, kl_beta=0.01)
    full = policy_loss(logp, old, adv, mask, ref_logp_BT=ref, **kw)
    n = mask.sum()
    parts = [policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], ref_logp_BT=ref[i:i + 2],
                         global_tokens=n, global_seqs=4, **kw) for i in (0, 2)]
    assert (parts[0].loss + parts[1].loss).item() == pytest.approx(full.loss.item(), rel=1e-6)
    s = policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean", ref_logp_BT=ref, **kw)
    per_seq = [((-torch.minimum(torch.exp(logp[i] - old[i]) * adv[i],
                                torch.clamp(torch.exp(logp[i] - old[i]), 0.8, 1.28) * adv[i])) * mask[i]).sum() / mask[i].sum()
               for i in range(4)]
    assert s.pg_loss.item() == pytest.approx(float(sum(per_seq) / 4), rel=1e-6)


def test_truncated_importance_sampling_weight():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    engine = torch.log(torch.tensor([[0.25, 0.5]]))  # weights 2.0 (capped at 1.5) and 1.0
    mask = torch.ones(1, 2)
    t = policy_loss(old, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2, engine_logp_BT=engine, tis_cap=1.5)
    assert t.loss.item() == pytest.approx(-(1.5 + 1.0) / 2, rel=1e-6)


def test_logprobs_exclude_padded_vocab():
    logits = torch.tensor([[[0.0, 0.0, 100.0]]])  # third entry is vocab padding
    lp = token_logprobs(logits, torch.tensor([[0]]), vocab_size=2)
    assert lp.item() == pytest.approx(math.log(0.5))
    assert entropy(logits, vocab_size=2).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("world,vocab,padded,temperature", [(1, 300, 384, 1.0), (2, 300, 384, 0.7), (3, 250, 384, 1.0)])
def test_vocab_parallel_logprobs_equal_full_softmax(world, vocab, padded, temperature):
    """Logprobs, their gradient and the entropy from vocabulary slices (never gathered) equal the
    full-vocabulary softmax; padded columns (filled with large values) get no mass and no gradient.
    world=3 puts the vocabulary end inside the second rank's slice and the third slice all padding."""
    from distributed import run_distributed

    for r in run_distributed("vocab_parallel_vs_full", world, vocab_size=vocab, padded=padded,
                             temperature=temperature):
        assert r["finite"]
        assert r["logp"] <= 1e-5 and r["entropy"] <= 1e-5, r
        assert r["grad"] <= 1e-6 * max(1.0, r["grad_scale"]) and r["padding_grad"] == 0.0, r


@pytest.mark.slow
def test_grpo_step_replay_invariance_tp_pp(tiny_hf, tiny_mcore):
    """The same rollout batch at TP1 / TP2 / PP2 / TP2xPP2: same loss and grad norm (<= 1e-5), and
    the first on-policy step has KL == 0, ratio == 1 and no clipping exactly. Full activation
    recompute (parallel.recompute) gives the same step too."""
    from distributed import run_distributed

    res = run_distributed("update_invariance", 4, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore),
                          layouts=[[1, 1], [2, 1], [1, 2], [2, 2], [2, 2, "recompute"]])[0]
    ref = res["tp1pp1"]
    assert ref["loss"] == pytest.approx(-(11 * 1.0 + 11 * -0.5) / 22, abs=1e-7)
    for layout, r in res.items():
        assert r["kl"] == 0.0 and r["ratio_mean"] == 1.0 and r["clip_frac"] == 0.0, (layout, r)
        assert abs(r["loss"] - ref["loss"]) <= 1e-5, (layout, r)
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= 1e-5 * max(1.0, ref["grad_norm"]), (layout, r)
        assert r["after"] == pytest.approx(ref["after"], abs=1e-4), (layout, r)
