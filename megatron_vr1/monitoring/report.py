"""`megatron-vr1 report RUN_DIR [--out PNG]`: a run's curves in one PNG.

Reads `RUN_DIR/metrics.jsonl` (written by the trainer's `JsonlSink`) and draws, against the step,
one panel per group that has data (panels without data are left out):

    reward            reward/mean
    accuracy          reward/accuracy, eval/accuracy
    response length   rollout/len_mean, rollout/len_p50, rollout/len_p90, rollout/len_max
    truncation rate   rollout/truncation_rate
    KL                train/kl
    entropy           train/entropy

PTST stage starts (where `ptst/stage` changes) are dashed vertical lines in every panel, labelled
with the stage and, when logged, its `ptst/max_response_length` and `ptst/group_size`.
A step logged twice (a run resumed from an older checkpoint re-logs the steps after it) keeps its
last value. Non-finite values are drawn as gaps. The PNG is written atomically (temp file, then
rename); default `RUN_DIR/report.png`. Needs matplotlib only (no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward/mean",)),
    ("accuracy", ("reward/accuracy", "eval/accuracy")),
    ("response length (tokens)",
     ("rollout/len_mean", "rollout/len_p50", "rollout/len_p90", "rollout/len_max")),
    ("truncation rate", ("rollout/truncation_rate",)),
    ("KL", ("train/kl",)),
    ("entropy", ("train/entropy",)),
)
"""(panel title, keys drawn in it)."""

STAGE_KEY = "ptst/stage"
STAGE_LABEL_KEYS = (("ptst/max_response_length", "max len"), ("ptst/group_size", "G"))

Series = tuple[list[int], list[float]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run folder holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/report.png)")


def run(args: argparse.Namespace) -> int:
    out = draw_report(args.run_dir, args.out)
    print(out)
    return 0


def read_metrics(path: str | Path) -> dict[str, Series]:
    """`metrics.jsonl` as `{key: (steps, values)}`, sorted by step, one value per step (the last).

    A torn last line (the writer was killed mid-line) is ignored; a bad line elsewhere is a
    ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: it is written by `megatron-vr1 train` / `megatron-vr1 sft` "
            "(the run's JsonlSink) once the first step is logged; is this the right run folder?"
        )
    by_key: dict[str, dict[int, float]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
            row = {key: float(value) for key, value in row.items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            if i == len(lines):
                continue
            want = '{"step": N, "section/name": value, ...}'
            raise ValueError(f"{path}:{i} is not a metrics line ({want})") from None
        for key, value in row.items():
            by_key.setdefault(key, {})[step] = value
    return {key: (sorted(vals), [vals[s] for s in sorted(vals)]) for key, vals in by_key.items()}


def stage_starts(series: dict[str, Series]) -> list[tuple[int, str]]:
    """`(first step, label)` of every PTST stage, from where `ptst/stage` changes."""
    if STAGE_KEY not in series:
        return []
    starts = []
    prev = None
    for step, stage in zip(*series[STAGE_KEY]):
        if stage != prev:
            parts = [f"stage {_fmt(stage)}"]
            for key, name in STAGE_LABEL_KEYS:
                value = _value_at(series.get(key), step)
                if value is not None:
                    parts.append(f"{name} {_fmt(value)}")
            starts.append((step, ", ".join(parts)))
            prev = stage
    return starts


def draw_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws `run_dir/metrics.jsonl` into a PNG (default `run_dir/report.png`); returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    out = run_dir / "report.png" if out is None else Path(out)
    series = read_metrics(run_dir / "metrics.jsonl")
    panels = [(title, [k for k in keys if k in series]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        wanted = ", ".join(k for _, keys in PANELS for k in keys)
        raise ValueError(
            f"{run_dir / 'metrics.jsonl'} has none of the keys the report draws ({wanted}); "
            f"it has: {', '.join(sorted(series)) or 'nothing yet'}"
        )
    stages = stage_starts(series)

    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(7 * ncols, 3.2 * nrows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    last_step = max(s for steps, _ in series.values() for s in steps)
    fig.suptitle(f"{run_dir.resolve().name}  (last step {last_step})", fontsize=13)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            steps, values = series[key]
            values = [v if math.isfinite(v) else math.nan for v in values]
            marker = "o" if len(steps) < 30 else None
            ax.plot(steps, values, label=key, marker=marker, markersize=3, linewidth=1.4)
        if stages:  # headroom above the curves for the stage labels
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.14 * (hi - lo))
        for i, (step, label) in enumerate(stages):
            if i > 0 or step > min(series[keys[0]][0]):  # no line at the very start of the plot
                ax.axvline(step, color="0.35", linestyle="--", linewidth=1)
            ax.annotate(
                label, xy=(step, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                textcoords="offset points", ha="left", va="top", fontsize=8, color="0.25",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )
        ax.set_title(title, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[: len(panels)][-ncols:]:
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _value_at(s: Series | None, step: int) -> float | None:
    """The value of `s` at `step`, else its first value after it, else None."""
    if s is None:
        return None
    for st, v in zip(*s):
        if st >= step:
            return v
    return None


def _fmt(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"
