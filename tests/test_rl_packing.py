"""Padding-free RL micro-batches: packed rows give each rollout the logprobs it gets alone, and
the same GRPO step, at TP1, TP2 and PP2 (real megatron-core on gloo)."""

from __future__ import annotations

import pytest


def test_minibatches_keep_groups_whole():
    from megatron_vr1.rl.batch import ScoredRollout, minibatches
    from megatron_vr1.rollout.engine import Rollout

    def s(p, j):
        return ScoredRollout(Rollout(prompt_index=p, sample_index=j, prompt_ids=[1], response_ids=[2],
                                     response_logprobs=[0.0], finish_reason="stop", response_text="", images=[],
                                     seconds=0.0), 0.0, False, False)

    scored = [s(p, j) for p in (7, 3, 9, 4, 5) for j in range(2)]
    chunks = minibatches(scored, 2)
    assert [[x.rollout.prompt_index for x in c] for c in chunks] == [[7, 7, 3, 3], [9, 9, 4, 4, 5, 5]]
    assert len(minibatches(scored, 9)) == 5  # never an empty optimizer step


def test_shared_prompt_layout_by_hand(tiny_hf):
    """Two rollouts of prompt [a b c] (responses [x y] and [z]) and one of another prompt, packed
    with prompt sharing: one row [a b | c x y | c z] + a unit of its own, the attention mask, and
    where each rollout's target positions land, written out by hand."""
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.rl.batch import ScoredRollout, collate
    from megatron_vr1.rollout.engine import Rollout

    arch, proc = load_hf_arch(tiny_hf), load_processor(tiny_hf)
    a, b, c, x, y, z, q = 11, 12, 13, 21, 22, 23, 31

    def s(p, j, prompt, resp):
        return ScoredRollout(Rollout(prompt_index=p, sample_index=j, prompt_ids=prompt, response_ids=resp,
                                     response_logprobs=[-0.5 - 0.1 * i for i in range(len(resp))],
                                     finish_reason="stop", response_text="", images=[], seconds=0.0),
                             0.0, False, False, advantage=float(j + 1))

    scored = [s(0, 0, [a, b, c], [x, y]), s(0, 1, [a, b, c], [z]), s(1, 0, [q, a], [y, x])]
    (mb,), S = collate(scored, proc, arch, 0, micro_batch_size=4, share_prompts=True)
    assert S == 7  # the group's unit: 2 + (1 + 2) + (1 + 1); the other unit (4 tokens) fits nowhere
    assert mb.inputs.input_ids_BS.tolist() == [[a, b, c, x, y, c, z], [q, a, y, x, 0, 0, 0]]
    sees = ~mb.inputs.attention_mask[0, 0]  # row 0: query -> key
    want = [[1, 0, 0, 0, 0, 0, 0],  # a
            [1, 1, 0, 0, 0, 0, 0],  # b
            [1, 1, 1, 0, 0, 0, 0],  # c (rollout 1)
            [1, 1, 1, 1, 0, 0, 0],  # x
            [1, 1, 1, 1, 1, 0, 0],  # y
            [1, 1, 0, 0, 0, 1, 0],  # c (rollout 2): the prompt, not rollout 1
            [1, 1, 0, 0, 0, 1, 1]]  # z
    assert sees.int().tolist() == want
    # text only: each token's position in its own rollout (t, h, w equal)
    assert mb.inputs.position_ids_3BS[0].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 3, 0, 0, 0]]
    # rollout targets t -> flat index into [R, S-1] = [2, 6]: a->b, b->c at 0, 1; then its own part
    assert mb.unpack_NT.tolist() == [[0, 1, 2, 3], [0, 1, 5, 0], [6, 7, 8, 0]]
    assert mb.loss_mask_BT.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0]]
    assert mb.adv_B.tolist() == [1.0, 2.0, 1.0]
    (mb2,), _ = collate(scored, proc, arch, 0, micro_batch_size=4, share_prompts=False)
    assert tuple(mb2.inputs.input_ids_BS.shape) == (3, 5)  # unshared: 5 | 4 | 4 tokens, rows of the longest


def test_packed_rows_equal_one_rollout_per_row(tiny_hf, tiny_mcore):
    from distributed import run_distributed

    res = run_distributed("packing_equivalence", 2, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore),
                          layouts=[[1, 1], [2, 1], [1, 2]])[0]
    ref = res["tp1pp1_rows"]
    assert len(ref["logp"]) == 12 and ref["micro_batches"] == 12
    packed = res["tp1pp1_packed"]
    assert packed["rows"] < ref["rows"], packed  # several rollouts share a row
    shared = res["tp1pp1_shared"]  # 4 prompts x 3 rollouts: each prompt once instead of 3 times
    assert shared["tokens"] < 0.75 * packed["tokens"], (shared["tokens"], packed["tokens"])
    assert len(res) == 9
    for layout, r in res.items():
        for key, lps in r["logp"].items():
            for lp in lps:  # identical rollouts (same key) appear once per sample
                want = ref["logp"][key][0]
                assert len(lp) == len(want)
                assert max(abs(a - b) for a, b in zip(lp, want)) <= 1e-6 if layout.startswith("tp1pp1") \
                    else max(abs(a - b) for a, b in zip(lp, want)) <= 1e-5, (layout, key)
        assert r["kl"] == 0.0 and r["ratio_mean"] == pytest.approx(1.0, abs=1e-7), (layout, r["kl"], r["ratio_mean"])
        tol = 1e-6 if layout.startswith("tp1pp1") else 1e-5
        assert r["loss"] == pytest.approx(ref["loss"], abs=tol), layout
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=tol, abs=tol), layout
