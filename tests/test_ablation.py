"""The ablation's pieces (docs/ablation.md): the imperfect cold-start generator, the report, the recipes.
Fast unit tests only; bench/ablation.sh itself is a benchmark, not part of the suite."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vr1.config import load_config
from megatron_vr1.data import synthetic
from megatron_vr1.data.synthetic import GRID, RECHECK, draw_splits, imperfect_plan, imperfect_response, write_synthetic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import ablation_report  # noqa: E402

RECHECK_PREFIX = RECHECK.split("{")[0]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(folder: Path) -> list[str]:
    lines = (folder / "coldstart_sft.jsonl").read_text().splitlines()
    return [json.loads(line)["conversations"][1]["value"] for line in lines]


def test_default_output_unchanged(tmp_path):
    sizes = dict(n_train=6, n_val=4, n_test=4, n_sft=40, seed=3)
    write_synthetic(tmp_path / "default", **sizes)
    write_synthetic(tmp_path / "perfect", **sizes, cold_start="perfect", wrong_rate=0.9, overthink_rate=0.9)
    write_synthetic(tmp_path / "imperfect", **sizes, cold_start="imperfect")
    default = _digest(tmp_path / "default")
    assert default == _digest(tmp_path / "perfect")
    imperfect = _digest(tmp_path / "imperfect")
    # Only the SFT text differs: the pictures and the RL parquets are the same.
    assert {k: v for k, v in imperfect.items() if k != "coldstart_sft.jsonl"} == \
        {k: v for k, v in default.items() if k != "coldstart_sft.jsonl"}
    assert imperfect["coldstart_sft.jsonl"] != default["coldstart_sft.jsonl"]
    # The perfect rows are the original CoT: one count, no re-check sentence, answer = the truth.
    problems = draw_splits(6, 4, 4, 40, 3)["sft"]
    rows = _rows(tmp_path / "default")
    assert rows == [synthetic.cot_response(p.shapes, p.answer) for p in problems]
    assert not any(RECHECK_PREFIX in r for r in rows)


def test_imperfect_rates_hold(tmp_path):
    n = 300
    write_synthetic(tmp_path, n_train=0, n_val=0, n_test=0, n_sft=n, seed=0, cold_start="imperfect",
                    wrong_rate=0.3, overthink_rate=0.4)
    problems = draw_splits(0, 0, 0, n, 0)["sft"]
    rows = _rows(tmp_path)
    wrong = over = blind_wrong = blind = 0
    for p, text in zip(problems, rows):
        said = int(text.split("<answer>")[1].split("</answer>")[0])
        think_count = int(text.split("Red shapes: ")[1].split(".")[0])
        assert said == think_count  # the answer follows the think text
        checks = text.count(RECHECK_PREFIX)
        assert checks in (0, 2, 3)
        assert all(RECHECK.format(n=said) in text for _ in range(checks))
        is_blind = any(s.row == GRID - 1 and s.color == "red" for s in p.shapes)
        blind += is_blind
        if said != int(p.answer):
            wrong += 1
            blind_wrong += is_blind
        over += checks > 0
    assert abs(wrong / n - 0.3) <= 0.02
    assert abs(over / n - 0.4) <= 0.02
    # The errors are the systematic blind spot (red shapes in the bottom row), not noise: most
    # such pictures are answered wrongly, so greedy imitation learns the error.
    assert blind_wrong == wrong
    assert blind_wrong / blind > 0.5


def test_imperfect_response_by_hand():
    S = synthetic.Shape
    shapes = [S("square", "red", 0, 0, 14, 0, 0), S("circle", "blue", 1, 1, 14, 30, 30),
              S("circle", "red", 3, 2, 14, 60, 90)]
    assert imperfect_response(shapes, "2", wrong=False, overthink=0)[0] == synthetic.cot_response(shapes, "2")
    text, said = imperfect_response(shapes, "2", wrong=True, overthink=2)
    assert said == 1
    assert text == ("<think>I see a red square, a blue circle. Red shapes: 1. Again: red shapes: 1. "
                    "Again: red shapes: 1.</think><answer>1</answer>")
    # No red shape in the bottom row: a wrong row miscounts by one instead (0 -> 1, never -1).
    text, said = imperfect_response(shapes[1:2], "0", wrong=True, overthink=0)
    assert said == 1 and text == "<think>I see a blue circle. Red shapes: 1.</think><answer>1</answer>"
    with pytest.raises(ValueError):
        imperfect_plan([], 1.5, 0.0, 0)
    with pytest.raises(ValueError):
        write_synthetic("/nonexistent-never", cold_start="sloppy")


def test_cli_flags(tmp_path):
    assert synthetic.main(["--out", str(tmp_path), "--n-train", "0", "--n-val", "0", "--n-test", "0", "--n-sft", "50",
                           "--cold-start", "imperfect", "--wrong-rate", "0.2", "--overthink-rate", "0.5"]) == 0
    rows = _rows(tmp_path)
    assert sum(RECHECK_PREFIX in r for r in rows) == 25


def test_report_table_and_png(tmp_path):
    lines = [
        {"arm": "coldstart", "seed": 0, "accuracy": 0.40, "len_mean": 45.0, "seconds": 60},
        {"arm": "ptst", "seed": 1, "accuracy": 0.70, "len_mean": 30.0, "rollouts": 3840, "optimizer_steps": 40, "seconds": 300},
        {"arm": "ptst", "seed": 2, "accuracy": 0.80, "len_mean": 34.0, "rollouts": 3840, "optimizer_steps": 40, "seconds": 360},
        {"arm": "ptst", "seed": 3, "accuracy": 0.90, "len_mean": 26.0, "rollouts": 3840, "optimizer_steps": 40, "seconds": 420},
        {"arm": "long", "seed": 1, "accuracy": 0.10, "len_mean": 50.0},
        {"arm": "long", "seed": 1, "accuracy": 0.60, "len_mean": 40.0},  # a rerun replaces seed 1
        {"arm": "long", "seed": 2, "accuracy": 0.50, "len_mean": 44.0},
    ]
    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert ablation_report.main(["table", str(res)]) == 0
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[2] == "| cold start only | 1 | 40.0 ± 0.0 | 45.0 ± 0.0 | - | - | 1.0 |"
    # ARMS order: long before ptst. long: acc 60, 50 -> 55.0 ± 7.07; len 40, 44 -> 42.0 ± 2.83.
    assert md[3] == "| Vision-R1-Long (one stage, 80 tokens) | 2 | 55.0 ± 7.1 | 42.0 ± 2.8 | - | - | - |"
    # ptst: acc 70/80/90 -> 80.0 ± 10.0; len 30/34/26 -> 30.0 ± 4.0; 360 s = 6.0 min.
    assert md[4] == "| PTST (40/G8 -> 80/G4) | 3 | 80.0 ± 10.0 | 30.0 ± 4.0 | 3840 | 40 | 6.0 |"
    assert len(md) == 5
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_run_budget_counts_resampling(tmp_path):
    steps = [{"step": 1, "ptst/group_size": 8.0, "train/optimizer_steps": 1.0},
             {"step": 2, "ptst/group_size": 4.0, "train/optimizer_steps": 1.0, "rollout/resample_rounds": 2.0},
             {"step": 2, "eval/accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in steps) + '{"torn')
    assert ablation_report.run_budget(tmp_path, 16) == {"rollouts": 16 * 8 + 3 * 16 * 4, "optimizer_steps": 2.0}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("tiny_ablation_*.yaml")), ids=lambda p: p.name)
def test_ablation_configs_load(path):
    cfg = load_config(path)
    assert all(s.max_response_length <= 80 for s in cfg.ptst.stages)


def test_ablation_rollout_budgets_equal():
    def rollouts(name):
        cfg = load_config(ROOT / "configs" / f"tiny_ablation_{name}.yaml")
        return sum(cfg.rollout.prompts_per_step * s.group_size * s.steps for s in cfg.ptst.stages if s.enabled)

    assert rollouts("ptst") == rollouts("long") == rollouts("zero") == rollouts("ptst_overlong") == 3840
    zero = load_config(ROOT / "configs" / "tiny_ablation_zero.yaml")
    assert zero.grpo.reward == "format_and_result" and zero.data.system_prompt
    sft_more = load_config(ROOT / "configs" / "tiny_ablation_sft_more.yaml")
    assert sft_more.sft.global_batch_size * 40 == 3840  # equal compute: PTST's 40 updates, its rollouts


@pytest.mark.slow
def test_every_arm_runs_end_to_end(tmp_path):
    """bench/ablation.sh itself at smoke size: data, the shared cold start, one seed of every arm
    (1 step per stage), export, scoring, and the report. Every arm scores, the equal budgets hold
    (PTST = Long = Zero = overlong rollouts; SFT's steps = PTST's), and the table and PNG exist."""
    env = dict(os.environ, RUN=str(tmp_path / "abl"), SEEDS="1", STAGE_STEPS="1", COLDSTART_STEPS="2",
               VAL_INTERVAL="1", N_TRAIN="48", N_VAL="8", N_TEST="8", N_SFT="64", KEEP="0", OMP_NUM_THREADS="2")
    r = subprocess.run(["bash", str(ROOT / "bench" / "ablation.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    res = [json.loads(x) for x in (tmp_path / "abl" / "results.jsonl").read_text().splitlines()]
    by_arm = {x["arm"]: x for x in res}
    assert set(by_arm) == {"coldstart", "sft_more", "long", "ptst", "zero", "ptst_dynamic", "ptst_overlong"}, by_arm
    for arm, x in by_arm.items():
        assert 0.0 <= x["accuracy"] <= 1.0 and x["len_mean"] > 0, (arm, x)
    P = 16
    assert by_arm["ptst"]["rollouts"] == P * (8 + 4) == by_arm["ptst_overlong"]["rollouts"] == by_arm["zero"]["rollouts"]
    assert by_arm["long"]["rollouts"] == P * 3 * 4 == by_arm["ptst"]["rollouts"]
    assert by_arm["ptst_dynamic"]["rollouts"] >= by_arm["ptst"]["rollouts"]
    assert by_arm["sft_more"]["optimizer_steps"] == by_arm["ptst"]["optimizer_steps"] == 2
    md = (tmp_path / "abl" / "results.md").read_text()
    assert md.count("\n|") >= 8  # header rule + 7 arms
    assert (tmp_path / "abl" / "results.png").read_bytes()[:4] == b"\x89PNG"
