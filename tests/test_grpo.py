"""GRPO math on fixed tensors, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vr1.rl.grpo import (entropy, group_advantages, informative_groups, kl_k3, kl_per_token, overlong_penalty,
                                  policy_loss, token_logprobs, truncation_mask)


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


def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))  # log(pi / ref) = log 2 and 0
    l2 = math.log(2)
    assert kl_per_token(logp, ref, "k1").tolist()[0] == pytest.approx([l2, 0.0], abs=1e-7)
    assert kl_per_token(logp, ref, "k2").tolist()[0] == pytest.approx([0.5 * l2 ** 2, 0.0], abs=1e-7)
    assert kl_per_token(logp, ref, "k3").tolist()[0] == pytest.approx([0.5 + l2 - 1.0, 0.0], abs=1e-7)
    assert torch.equal(kl_per_token(logp, ref), kl_k3(logp, ref))
    # k1 can be negative (pi below ref); k2 and k3 cannot
    assert kl_per_token(ref, logp, "k1")[0, 0].item() == pytest.approx(-l2, abs=1e-7)
    assert kl_per_token(ref, logp, "k3")[0, 0].item() == pytest.approx(2.0 - l2 - 1.0, abs=1e-6)
    mask = torch.ones(1, 2)
    for est, kl_tok in (("k1", l2), ("k2", 0.5 * l2 ** 2), ("k3", l2 - 0.5)):
        t = policy_loss(logp, logp.clone(), torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2, kl_beta=0.1,
                        ref_logp_BT=ref, kl_estimator=est)
        assert t.kl.item() == pytest.approx(kl_tok / 2, rel=1e-6)
        assert t.loss.item() == pytest.approx(-1.0 + 0.1 * kl_tok / 2, rel=1e-6)  # ratio 1, A = 1
    for bad in ("k4", "K3"):
        with pytest.raises(ValueError, match=f"'{bad}'.*k1, k2, k3"):
            kl_per_token(logp, ref, bad)
        with pytest.raises(ValueError, match=f"'{bad}'.*k1, k2, k3"):
            policy_loss(logp, logp, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2, kl_estimator=bad)


def _bonus_case():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 5) * 2
    targets = torch.randint(0, 4, (2, 3))
    old = token_logprobs(logits, targets, vocab_size=4) + 0.1 * torch.randn(2, 3)
    ref = old - 0.05
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logits, targets, old, ref, mask


def _loss_and_grad(coef, with_entropy, agg="token-mean"):
    logits, targets, old, ref, mask = _bonus_case()
    z = logits.clone().requires_grad_(True)
    logp = token_logprobs(z, targets, vocab_size=4)
    t = policy_loss(logp, old, torch.tensor([0.7, -1.2]), mask, clip_low=0.2, clip_high=0.28, kl_beta=0.01,
                    ref_logp_BT=ref, agg=agg, entropy_BT=entropy(z, vocab_size=4) if with_entropy else None,
                    entropy_coef=coef)
    t.loss.backward()
    return t, z.grad


def test_entropy_bonus_gradient_by_hand():
    # one token, logits [0, ln 3]: p = [1/4, 3/4], H = ln 4 - (3/4) ln 3,
    # dH/dz_j = -p_j (ln p_j + H) = [(3/16) ln 3, -(3/16) ln 3]
    z = torch.tensor([[[0.0, math.log(3)]]], requires_grad=True)
    h = entropy(z)
    assert h.item() == pytest.approx(math.log(4) - 0.75 * math.log(3), rel=1e-6)
    lp = torch.zeros(1, 1)  # the policy term has no gradient to z here; only the bonus does
    t = policy_loss(lp, lp, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.2,
                    entropy_BT=h, entropy_coef=0.5)
    assert t.loss.item() == pytest.approx(-1.0 - 0.5 * h.item(), rel=1e-6)
    assert t.entropy.item() == pytest.approx(h.item(), rel=1e-6)
    t.loss.backward()
    g = 3 / 16 * math.log(3)
    assert z.grad[0, 0].tolist() == pytest.approx([-0.5 * g, 0.5 * g], rel=1e-5)

    # bigger case: grad(coef) - grad(0) = -coef * d(sum_t m_t H_t / N)/dz, with the same hand formula
    logits, _, _, _, mask = _bonus_case()
    for agg in ("token-mean", "seq-mean-token-mean"):
        t1, g1 = _loss_and_grad(0.3, True, agg)
        _, g0 = _loss_and_grad(0.0, False, agg)
        logp_all = torch.log_softmax(logits[..., :4], dim=-1)
        p = logp_all.exp()
        dH = -p * (logp_all + entropy(logits, 4)[..., None])  # [B, T, 4]
        w = mask / mask.sum() if agg == "token-mean" else mask / mask.sum(dim=1, keepdim=True) / mask.shape[0]
        expected = torch.zeros_like(logits)
        expected[..., :4] = -0.3 * w[..., None] * dH
        assert torch.allclose(g1 - g0, expected, atol=1e-6), agg
        assert g1[..., 4:].abs().max().item() == 0.0  # the padded column gets nothing


def test_entropy_coef_zero_is_bit_identical():
    t_plain, g_plain = _loss_and_grad(0.0, False)
    t_ent, g_ent = _loss_and_grad(0.0, True)
    assert torch.equal(t_plain.loss, t_ent.loss) and torch.equal(g_plain, g_ent)
    assert t_plain.entropy is None and t_ent.entropy is not None and not t_ent.entropy.requires_grad
    with pytest.raises(ValueError, match="entropy_coef=0.1"):
        lp = torch.zeros(1, 1)
        policy_loss(lp, lp, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.2, entropy_coef=0.1)


def test_vocab_parallel_entropy_with_grad_single_rank():
    """The update's differentiable entropy (TP = 1, no process group) equals the full softmax
    entropy and its autograd gradient; padded columns (large garbage) get none."""
    from megatron_vr1.trainer.logprobs import vocab_parallel_entropy
    from megatron_vr1.rl.update import LossSettings
    from megatron_vr1.trainer.logprobs import vocab_parallel_entropy_with_grad

    assert (LossSettings().kl_estimator, LossSettings().entropy_coef) == ("k3", 0.0)
    torch.manual_seed(4)
    full = torch.randn(2, 3, 8) * 3
    full[..., 6:] = 50.0
    go = torch.randn(2, 3)
    a = full.clone().requires_grad_(True)
    ent = vocab_parallel_entropy_with_grad(a, 6)
    (ent * go).sum().backward()
    b = full.clone().requires_grad_(True)
    ref = entropy(b, vocab_size=6)
    (ref * go).sum().backward()
    assert torch.allclose(ent, ref, atol=1e-6) and torch.equal(ent, vocab_parallel_entropy(full, 6))
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert a.grad[..., 6:].abs().max().item() == 0.0


def test_informative_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0,  0.5, 0.5, 0.5, 0.5,  0.0, 0.0, 0.0, 1e-9,  2.0, 2.0, 2.0, 2.0 + 1e-13])
    assert informative_groups(r, 4).tolist() == [True, False, True, False]
    assert informative_groups(torch.tensor([1.0, 2.0]), 1).tolist() == [False, False]
    with pytest.raises(ValueError, match="whole number of groups"):
        informative_groups(r, 3)


def test_overlong_penalty_by_hand():
    # max_len 100, buffer 20: free up to 80, then -1.5 * (L - 80) / 20, -1.5 from 100 on
    lengths = torch.tensor([10, 80, 81, 90, 99, 100, 120])
    pen = overlong_penalty(lengths, max_len=100, buffer=20, penalty=1.5)
    assert pen.dtype == torch.float32 and pen.shape == (7,)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -1.5 / 20, -0.75, -1.5 * 19 / 20, -1.5, -1.5], abs=1e-7)
    assert overlong_penalty([5, 100, 300], max_len=100, buffer=0, penalty=1.0).tolist() == [0.0, 0.0, 0.0]
    assert overlong_penalty([100], max_len=100, buffer=10, penalty=0.0).tolist() == [0.0]
    with pytest.raises(ValueError, match="buffer=-1"):
        overlong_penalty(lengths, max_len=100, buffer=-1, penalty=1.0)
    with pytest.raises(ValueError, match="buffer=100"):
        overlong_penalty(lengths, max_len=100, buffer=100, penalty=1.0)
    with pytest.raises(ValueError, match="penalty=-0.5"):
        overlong_penalty(lengths, max_len=100, buffer=10, penalty=-0.5)


def test_truncation_mask():
    m = truncation_mask(["stop", "length", "abort", "length"])
    assert m.dtype == torch.float32 and m.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert truncation_mask([]).shape == (0,)
