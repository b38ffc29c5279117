"""Counting, logging and skipping bad data rows (docs/design.md, "Bad input").

A loader raises `BadRow(reason, detail)` for a row it cannot use; the caller records it in a
`SkipReport`, which logs one summary line per file and raises `ValueError` when nothing is left.
A bad row never crashes a run and never silently changes a batch size: it is simply not a row.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

MAX_EXAMPLES_PER_REASON = 5
"""Row indices (and the first detail) kept per reason for the summary line."""


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short snake_case key for the counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipReport:
    """What a loader kept and skipped in one file."""

    path: Path | str
    """The file (or a name for what was processed)."""
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Skipped rows by reason."""
    examples: dict[str, list[int]] = field(default_factory=dict)
    """The first few skipped row indices by reason."""
    details: dict[str, str] = field(default_factory=dict)
    """The first skipped row's detail by reason (what exactly was wrong)."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, index: int, bad: BadRow) -> None:
        self.skipped[bad.reason] += 1
        rows = self.examples.setdefault(bad.reason, [])
        if len(rows) < MAX_EXAMPLES_PER_REASON:
            rows.append(index)
        if bad.detail:
            self.details.setdefault(bad.reason, bad.detail)

    def summary(self, what: str = "rows") -> str:
        """One line: `<file>: N rows kept, M skipped (reason: count, rows [..], e.g. detail; ...)`."""
        line = f"{self.path}: {self.kept} {what} kept, {self.num_skipped} skipped"
        if self.skipped:
            parts = []
            for reason, count in self.skipped.most_common():
                part = f"{reason}: {count}, rows {self.examples[reason]}"
                if reason in self.details:
                    part += f", e.g. {self.details[reason]}"
                parts.append(part)
            line += " (" + "; ".join(parts) + ")"
        return line

    def log(self, logger: logging.Logger, what: str = "rows") -> None:
        """The summary line: a warning if anything was skipped, else info."""
        logger.log(logging.WARNING if self.skipped else logging.INFO, self.summary(what))

    def raise_if_all_bad(self, what: str = "rows") -> None:
        """`ValueError` naming the file and the most common reason when nothing was kept."""
        if self.kept:
            return
        if not self.skipped:
            raise ValueError(f"{self.path} holds no {what}; point the config at a non-empty file")
        reason, count = self.skipped.most_common(1)[0]
        detail = f" (e.g. {self.details[reason]})" if reason in self.details else ""
        raise ValueError(
            f"{self.path}: all {self.num_skipped} {what} are bad, most often {reason!r} ({count} {what}){detail}; "
            f"fix the data or point the config at another file. {self.summary(what)}"
        )


T = TypeVar("T")


@dataclass
class LoadResult(Generic[T]):
    """The good rows of a file and what was skipped."""

    rows: list[T]
    report: SkipReport
