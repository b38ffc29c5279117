"""Monitoring: the metrics sinks (JSONL exactness, key rules, TensorBoard, rank 0 writes, W&B
optional) and the `report` PNG."""

import importlib.util
import json
import math
import warnings

import pytest

from megatron_vr1.monitoring import (
    SECTIONS,
    JsonlSink,
    MetricsSink,
    MultiSink,
    NullSink,
    TensorBoardSink,
    WandbSink,
    check_key,
    make_sink,
)
from megatron_vr1.monitoring.report import draw_report, read_metrics, stage_starts

# Vision-R1's PTST: 4K tokens x 16 samples, 8K x 8, 16K x 4.
STAGES = ((0, 4096, 16), (1, 8192, 8), (2, 16384, 4))
STEPS_PER_STAGE = 20


def _write_run(run_dir, stages=STAGES):
    """A synthetic 60-step run through JsonlSink, as the trainer would log it."""
    sink = JsonlSink(run_dir / "metrics.jsonl")
    step = 0
    for stage, max_len, group in stages:
        for _ in range(STEPS_PER_STAGE):
            step += 1
            t = step / (len(stages) * STEPS_PER_STAGE)
            mean_len = max_len * (0.3 + 0.4 * t)
            metrics = {
                "reward/mean": 0.2 + 0.6 * t,
                "reward/accuracy": 0.3 + 0.5 * t,
                "rollout/len_mean": mean_len,
                "rollout/len_p50": 0.9 * mean_len,
                "rollout/len_p90": min(1.6 * mean_len, max_len),
                "rollout/len_max": max_len,
                "rollout/truncation_rate": 0.15 * (1 - t),
                "train/kl": 1e-3 * step,
                "train/entropy": 0.8 - 0.3 * t,
                "ptst/stage": stage,
                "ptst/max_response_length": max_len,
                "ptst/group_size": group,
            }
            sink.log(metrics, step)
            if step % 10 == 0:
                sink.log({"eval/accuracy": 0.25 + 0.5 * t}, step)
    sink.close()
    return step


def test_jsonl_round_trips_floats_exactly(tmp_path):
    values = {
        "train/a": 0.1 + 0.2,
        "train/b": 1e-300,
        "train/c": 5e-324,
        "train/d": 1 / 3,
        "train/e": -2.5e17,
        "train/f": 3,
    }
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log(values, step=7)
    sink.log({"reward/mean": 0.5}, step=8)
    # flushed on every call: readable before close
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    sink.close()
    assert len(lines) == 2
    row = json.loads(lines[0])
    assert row.pop("step") == 7
    assert row == {k: float(v) for k, v in values.items()}
    assert all(type(v) is float for v in row.values())
    assert row["train/a"] == 0.30000000000000004 and row["train/b"] == 1e-300
    # append mode: a resumed run adds to the file
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({"reward/mean": 0.25}, step=8)
    sink.close()
    assert read_metrics(tmp_path / "metrics.jsonl")["reward/mean"] == ([8], [0.25])


def test_nonfinite_values_are_logged_and_warned_once_per_key(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    with pytest.warns(RuntimeWarning, match="train/kl") as record:
        sink.log({"train/kl": math.nan, "train/entropy": 0.5}, step=1)
        sink.log({"train/kl": math.inf}, step=2)
    assert len(record) == 1
    sink.close()
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert math.isnan(rows[0]["train/kl"]) and rows[1]["train/kl"] == math.inf


@pytest.mark.parametrize("key", ["kl", "train", "train/", "/kl", "health/nonfinite", "Train/kl", "train/a b",
                                 "train//kl", "train/kl/"])
def test_bad_keys_are_rejected(tmp_path, key):
    for sink in (JsonlSink(tmp_path / "m.jsonl"), NullSink()):
        with pytest.raises(ValueError, match="section/name") as e:
            sink.log({key: 1.0}, step=0)
        assert repr(key) in str(e.value) and all(s in str(e.value) for s in SECTIONS)
    with pytest.raises(ValueError, match="section/name"):
        NullSink().log_text(key, "text", step=0)
    assert (tmp_path / "m.jsonl").read_text() == ""


def test_good_keys_pass():
    for section in SECTIONS:
        check_key(f"{section}/x")
    check_key("eval/mathvista/accuracy")
    check_key("perf/tokens_per_s-rollout.v2")
    with pytest.raises(ValueError, match="not a number"):
        NullSink().log({"train/kl": "high"}, step=0)


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sink.log({"train/kl": 0.25, "reward/mean": 0.5}, step=1)
    sink.log({"train/kl": 0.125}, step=2)
    sink.log_text("rollout/sample", "<think>2 red</think><answer>2</answer>", step=2)
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/kl", "reward/mean"}
    assert [(e.step, e.value) for e in acc.Scalars("train/kl")] == [(1, 0.25), (2, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.5)]


def test_make_sink_rank0_writes_other_ranks_do_not(tmp_path):
    other = make_sink(tmp_path / "r1", rank=1)
    assert isinstance(other, NullSink) and isinstance(other, MetricsSink)
    other.log({"train/kl": 1.0}, step=1)
    other.close()
    assert not (tmp_path / "r1").exists()

    sink = make_sink(tmp_path / "r0", rank=0)
    assert isinstance(sink, MultiSink) and isinstance(sink, MetricsSink)
    with pytest.warns(RuntimeWarning) as record:  # MultiSink warns once, not once per backend
        sink.log({"train/kl": math.nan}, step=1)
    assert len(record) == 1
    sink.log({"train/kl": 0.5}, step=2)
    sink.log_text("rollout/sample", "héllo", step=2)
    sink.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "r0/metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "r0/samples.jsonl").read_text()) == {
        "step": 2, "tag": "rollout/sample", "text": "héllo"}
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "r0/tensorboard").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_is_a_clear_import_error(tmp_path):
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbSink("vr1", tmp_path, mode="offline")
    with pytest.raises(ImportError, match="wandb_project=null"):
        make_sink(tmp_path / "run", wandb_project="vr1")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before opening files


def test_stage_starts_and_resumed_steps(tmp_path):
    last = _write_run(tmp_path)
    # a resume from step 50 re-logs 51..: the last value of a step wins
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 55, "reward/mean": -1.0}) + "\n")
        f.write('{"step": 56, "reward/me')  # torn last line: ignored
    series = read_metrics(tmp_path / "metrics.jsonl")
    steps, values = series["reward/mean"]
    assert steps == list(range(1, last + 1)) and values[54] == -1.0
    assert series["eval/accuracy"][0] == [10, 20, 30, 40, 50, 60]
    assert stage_starts(series) == [
        (1, "stage 0, max len 4096, G 16"),
        (21, "stage 1, max len 8192, G 8"),
        (41, "stage 2, max len 16384, G 4"),
    ]


def test_report_png(tmp_path):
    from PIL import Image

    run_dir = tmp_path / "tiny_ptst"
    run_dir.mkdir()
    _write_run(run_dir)
    out = draw_report(run_dir)
    assert out == run_dir / "report.png"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 800
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_report_omits_empty_panels(tmp_path):
    from PIL import Image

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    with Image.open(draw_report(tmp_path, tmp_path / "sub" / "r.png")) as im:
        one_panel = im.size
    assert one_panel[1] < 500
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "perf/tokens_per_s": 5.0}) + "\n")
    with pytest.raises(ValueError, match="perf/tokens_per_s"):
        draw_report(tmp_path)


def test_report_cli(tmp_path, capsys):
    from megatron_vr1.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_run(run_dir)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert capsys.readouterr().out.split() == [str(tmp_path / "r.png"), str(run_dir / "report.png")]


def test_report_without_metrics_is_a_clear_error(tmp_path, capsys):
    from megatron_vr1.cli import main

    with pytest.raises(FileNotFoundError, match="metrics.jsonl.*megatron-vr1 train"):
        draw_report(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "metrics.jsonl") in err


def test_progress_lines_when_not_a_terminal():
    """One plain line per step (Slurm logs, piped consoles) with the fields, elapsed time and ETA."""
    import io

    from megatron_vr1.monitoring.progress import Progress, format_seconds

    out = io.StringIO()
    p = Progress(10, "rl step", start=2, stream=out, tty=False)
    p.update(3, {"stage": "1/2", "reward": "0.500"})
    p.update(4, {"stage": "1/2", "reward": "0.625"})
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("rl step 3/10 | stage 1/2 | reward 0.500 | elapsed ")
    assert "| eta " in lines[1] and "?" not in lines[1]
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "1:05"
    quiet = io.StringIO()
    Progress(5, "sft step", stream=quiet, tty=False, enabled=False).update(1, {"loss": "1"})
    assert quiet.getvalue() == ""  # only global rank 0 prints
