"""Metrics sinks: one small interface, a file per backend, rank 0 writes.

Every training loop talks to a `MetricsSink`:

    sink = make_sink(run_dir, wandb_project=cfg.logging.wandb_project, rank=rank)
    sink.log({"reward/mean": 0.41, "train/kl": 1.2e-3}, step=step)
    sink.log_text("rollout/sample", completion, step=step)
    sink.close()

`make_sink` gives rank 0 a `MultiSink` of
  - `JsonlSink(run_dir / "metrics.jsonl")`: one JSON line per `log` call, `{"step": s, **metrics}`,
    floats written with their shortest exact repr, so `json.loads` gives back the very same floats
    (this is the file `megatron-vr1 report` draws and golden-metric tests compare); text goes to
    `run_dir / "samples.jsonl"` as `{"step", "tag", "text"}`;
  - `TensorBoardSink(run_dir / "tensorboard")` (unless `tensorboard=False`);
  - `WandbSink` when a W&B project is given (wandb is an optional dependency);
and every other rank a `NullSink`, which still checks the keys, so a bad key fails on every rank.

Keys are namespaced by the caller as `section/name` (`name` may itself contain `/`, e.g.
`eval/mathvista/accuracy`), with `section` one of `SECTIONS`; anything else is a ValueError.
Values are converted with `float()` (Python numbers, numpy scalars, 0-d tensors). Non-finite
values (nan, inf) are logged as they are, and each sink warns once per key that produced one.
"""

from __future__ import annotations

import html
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

SECTIONS = ("train", "rollout", "reward", "perf", "ptst", "eval", "sft", "mismatch")
"""The allowed first components of a metric key."""

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


@runtime_checkable
class MetricsSink(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Records scalars `{"section/name": value}` at `step`."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Records a piece of text (e.g. a sampled completion) under `tag` ("section/name") at `step`."""

    def flush(self) -> None:
        """Pushes what was logged so far to disk / the service."""

    def close(self) -> None:
        """Flushes and releases the backend; the sink is unusable afterwards."""


def check_key(key: str) -> None:
    """Raises ValueError unless `key` is `section/name` with section in SECTIONS."""
    section, sep, name = key.partition("/") if isinstance(key, str) else ("", "", "")
    if not sep or section not in SECTIONS or not _NAME_RE.fullmatch(name):
        why = f"section {section!r} is not allowed" if sep and section not in SECTIONS else "bad form"
        raise ValueError(
            f"metric key {key!r} ({why}): keys must look like 'section/name' (letters, digits, '_', '.', "
            f"'-', and '/' between parts) with section one of {', '.join(SECTIONS)}; "
            "e.g. 'train/kl', 'reward/mean'"
        )


class _Sink:
    """Shared front half of the sinks: checks keys, converts values to float, warns once per key on
    non-finite values, then hands the clean dict to `_write`."""

    def __init__(self) -> None:
        self._warned_nonfinite: set[str] = set()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._write(self._clean(metrics, step), int(step))

    def log_text(self, tag: str, text: str, step: int) -> None:
        check_key(tag)
        self._write_text(tag, str(text), int(step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _write(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _write_text(self, tag: str, text: str, step: int) -> None:
        raise NotImplementedError

    def _clean(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in metrics.items():
            check_key(key)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} at step {step} is {value!r}, not a number") from None
            if not math.isfinite(value) and key not in self._warned_nonfinite:
                self._warned_nonfinite.add(key)
                warnings.warn(
                    f"metric {key!r} is {value} at step {step}; logged as is (warned once per key)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            out[key] = value
        return out


class NullSink(_Sink):
    """Writes nothing (ranks other than 0); still checks keys so every rank fails alike."""

    def _write(self, metrics: dict[str, float], step: int) -> None:
        pass

    def _write_text(self, tag: str, text: str, step: int) -> None:
        pass


class JsonlSink(_Sink):
    """Appends one line `{"step": step, **metrics}` per `log` call and flushes it at once.

    Floats are written with `repr` (what `json.dumps` does), the shortest string that parses back
    to the same float: `json.loads` of a line gives bit-identical values. nan/inf are written as
    `NaN`/`Infinity` (Python's json reads them; a strict JSON parser does not). Texts go to
    `text_path` if given, else they are dropped.
    """

    def __init__(self, path: str | Path, text_path: str | Path | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self.text_path = None if text_path is None else Path(text_path)
        self._text_file = None

    def _write(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def _write_text(self, tag: str, text: str, step: int) -> None:
        if self.text_path is None:
            return
        if self._text_file is None:
            self._text_file = open(self.text_path, "a", encoding="utf-8")
        self._text_file.write(json.dumps({"step": step, "tag": tag, "text": text}, ensure_ascii=False) + "\n")
        self._text_file.flush()

    def close(self) -> None:
        self._file.close()
        if self._text_file is not None:
            self._text_file.close()


class TensorBoardSink(_Sink):
    """`torch.utils.tensorboard.SummaryWriter` on `log_dir`: scalars as `add_scalar`, text as `add_text`."""

    def __init__(self, log_dir: str | Path) -> None:
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def _write(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def _write_text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders text as markdown; a fenced block keeps a completion's layout.
        self._writer.add_text(tag, f"```\n{text}\n```", global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink(_Sink):
    """A Weights & Biases run in `run_dir` (offline by default: sync later with `wandb sync`).

    wandb is optional and imported here, not at module import; without it this raises an
    ImportError that says how to install it or how to turn W&B off.
    """

    def __init__(
        self,
        project: str,
        run_dir: str | Path,
        mode: Literal["offline", "online"] = "offline",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("offline", "online"):
            raise ValueError(f"W&B mode {mode!r} must be 'offline' or 'online'")
        try:
            import wandb
        except ImportError:
            raise ImportError(
                f"W&B logging was asked for (project {project!r}) but the wandb package is not installed: "
                "`pip install wandb`, or set logging.wandb_project=null to log to TensorBoard only",
                name="wandb",
            ) from None
        self._wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project, dir=str(run_dir), name=run_dir.name, mode=mode, config=dict(config or {})
        )

    def _write(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def _write_text(self, tag: str, text: str, step: int) -> None:
        self._run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiSink(_Sink):
    """Fans every call out to `sinks`. Keys are checked (and non-finite values warned about) once,
    here; sinks of this module then skip their own check."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        super().__init__()
        self.sinks = list(sinks)

    def _write(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            if isinstance(sink, _Sink):
                sink._write(metrics, step)
            else:
                sink.log(metrics, step)

    def _write_text(self, tag: str, text: str, step: int) -> None:
        for sink in self.sinks:
            if isinstance(sink, _Sink):
                sink._write_text(tag, text, step)
            else:
                sink.log_text(tag, text, step)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def make_sink(
    run_dir: str | Path,
    tensorboard: bool = True,
    wandb_project: str | None = None,
    wandb_mode: Literal["offline", "online"] = "offline",
    rank: int = 0,
    wandb_config: Mapping[str, Any] | None = None,
) -> MetricsSink:
    """The run's sink: on rank 0 `metrics.jsonl` (+ `samples.jsonl` for texts), TensorBoard in
    `run_dir/tensorboard` and W&B if `wandb_project`; a NullSink on every other rank."""
    if rank != 0:
        return NullSink()
    run_dir = Path(run_dir)
    # W&B first: if wandb is missing, fail before any file is opened.
    wandb = WandbSink(wandb_project, run_dir, mode=wandb_mode, config=wandb_config) if wandb_project else None
    sinks: list[MetricsSink] = [JsonlSink(run_dir / "metrics.jsonl", text_path=run_dir / "samples.jsonl")]
    if tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if wandb is not None:
        sinks.append(wandb)
    return MultiSink(sinks)
