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


def test_packed_rows_equal_one_rollout_per_row(tiny_hf, tiny_mcore):
    from distributed import run_distributed

    res = run_distributed("packing_equivalence", 2, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore),
                          layouts=[[1, 1], [2, 1], [1, 2]])[0]
    ref = res["tp1pp1_rows"]
    assert len(ref["logp"]) == 12 and ref["micro_batches"] == 12
    packed = res["tp1pp1_packed"]
    assert packed["rows"] < ref["rows"], packed  # several rollouts share a row
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
