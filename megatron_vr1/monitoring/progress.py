"""One progress line per training step, for people watching a console.

On a terminal a tqdm bar is redrawn under the lines; elsewhere (Slurm logs, `make demo` piped to
a file) each step prints one plain line with the elapsed time and the ETA. Lines go to stdout;
library logs (megatron-core, vLLM) go to stderr, so `cmd 2> run.log` leaves only the progress on
the console. Only the global rank 0 prints.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """`update(done, fields)` after each step; `done` counts steps of the whole run (resumed runs
    start at their resume point, and the ETA counts only the steps run in this process)."""

    def __init__(self, total: int, desc: str, start: int = 0, enabled: bool = True,
                 stream: Optional[TextIO] = None, tty: Optional[bool] = None):
        self.total, self.desc, self.start = total, desc, start
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.perf_counter()
        self.bar = None
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, file=self.stream, leave=False,
                            dynamic_ncols=True)

    def eta(self, done: int) -> float:
        ran = done - self.start
        if ran <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / ran * (self.total - done)

    def line(self, done: int, fields: dict[str, str]) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = self.eta(done)
        parts = [f"{self.desc} {done}/{self.total}", *(f"{k} {v}" for k, v in fields.items()),
                 f"elapsed {format_seconds(elapsed)}", f"eta {format_seconds(eta) if eta == eta else '?'}"]
        return " | ".join(parts)

    def update(self, done: int, fields: dict[str, str]) -> None:
        if not self.enabled:
            return
        text = self.line(done, fields)
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
            self.bar.n = done
            self.bar.refresh()
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
