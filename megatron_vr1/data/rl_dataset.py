"""RL rows (Vision-R1-rl / geometry3k parquet schema), their chat prompts, and the prompt order.

Schema (Vision-R1-rl; docs/method.md, "Data rows"), one row per problem:

* `images`: a list of images, each a Hugging Face `Image` cell (`{"bytes": ..., "path": ...}`;
  a cell with no bytes is read from `path`, relative to the parquet's folder) or raw bytes.
  Alias: `image`, one image per row (a list is accepted too).
* `problem`: text with one `<image>` placeholder per image, where the image goes in the prompt.
  Alias: `question`.
* `answer`: the ground truth, a string (numbers are converted with `str`).

A missing column is a file-level error (`ValueError` listing the columns found). Bad rows are
counted by reason, logged in one summary line per file and skipped (docs/design.md, "Bad input"):
`no_images`, `placeholder_mismatch` (count of `<image>` != number of images), `missing_problem`,
`missing_answer` (null or blank), `undecodable_image`. A file with no good row raises
`ValueError` naming the file and the most common reason.
"""

from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Iterator, Sequence, TypeVar

from PIL import Image

from megatron_vr1.config import R1_ZERO_SYSTEM_PROMPT  # noqa: F401  (re-exported)
from megatron_vr1.data.bad_rows import BadRow, LoadResult, SkipReport
from megatron_vr1.rollout.engine import RolloutPrompt

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
IMAGE_COLUMNS = ("images", "image")
"""Accepted image columns, in order of preference (`image`: one image per row)."""
PROBLEM_COLUMNS = ("problem", "question")
ANSWER_COLUMN = "answer"


@dataclass
class RLRow:
    images: list[Image.Image]
    """Decoded RGB images, in placeholder order."""
    problem: str
    """The question, with one `<image>` placeholder per image."""
    answer: str
    """Ground truth (stripped)."""
    index: int
    """Row number in the source file (stable across runs; for logs and per-row metrics)."""


# ------------------------------------------------------------------------------------ loading


def decode_image(cell: Any, base: Path) -> Image.Image:
    """A Hugging Face `Image` cell (`{"bytes", "path"}`) or raw bytes -> an RGB PIL image."""
    data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
    if data is None and path:
        file = Path(path) if Path(path).is_absolute() else base / path
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise BadRow("undecodable_image", f"cannot read {file}: {exc.strerror or exc}") from None
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadRow("undecodable_image", f"no image bytes in the cell ({type(cell).__name__})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            # RGB here, so every consumer (trainer processor, vLLM) sees the same pixels for
            # palette / RGBA / grey PNGs.
            return image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise BadRow("undecodable_image", f"{type(exc).__name__}: {exc}") from None


def _pick_column(names: list[str], candidates: tuple[str, ...], path: Path, role: str) -> str:
    for name in candidates:
        if name in names:
            return name
    raise ValueError(
        f"{path} has no {role} column (looked for {' or '.join(map(repr, candidates))}; found {names}); "
        "RL data needs the geometry3k schema: images, problem, answer"
    )


def _parse_row(index: int, images_cell: Any, problem: Any, answer: Any, base: Path) -> RLRow:
    if images_cell is None:
        cells = []
    elif isinstance(images_cell, (list, tuple)):
        cells = list(images_cell)
    else:
        cells = [images_cell]  # the single-image `image` column
    if not cells:
        raise BadRow("no_images")
    if not isinstance(problem, str) or not problem.strip():
        raise BadRow("missing_problem")
    placeholders = problem.count(IMAGE_PLACEHOLDER)
    if placeholders != len(cells):
        raise BadRow("placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} for {len(cells)} images")
    if answer is None or not str(answer).strip():
        raise BadRow("missing_answer")
    images = [decode_image(cell, base) for cell in cells]
    return RLRow(images=images, problem=problem, answer=str(answer).strip(), index=index)


def load_rl_data(path) -> LoadResult[RLRow]:
    """`load_rl_rows` plus its `SkipReport` (skipped rows by reason, for metrics)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RL data file {path} does not exist; check data.train_path / data.val_path")
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    image_col = _pick_column(names, IMAGE_COLUMNS, path, "image")
    problem_col = _pick_column(names, PROBLEM_COLUMNS, path, "problem")
    answer_col = _pick_column(names, (ANSWER_COLUMN,), path, "answer")
    rows: list[RLRow] = []
    report = SkipReport(path)
    index = 0
    for batch in file.iter_batches(batch_size=256, columns=[image_col, problem_col, answer_col]):
        data = batch.to_pydict()
        for cell, problem, answer in zip(data[image_col], data[problem_col], data[answer_col]):
            try:
                rows.append(_parse_row(index, cell, problem, answer, path.parent))
                report.kept += 1
            except BadRow as bad:
                report.add(index, bad)
            index += 1
    report.log(logger)
    report.raise_if_all_bad()
    return LoadResult(rows, report)


def load_rl_rows(path) -> list[RLRow]:
    """The good rows of a Vision-R1-rl parquet file (bad ones counted, logged once, skipped)."""
    return load_rl_data(path).rows


# ------------------------------------------------------------------------------------ prompts


def placeholder_content(text: str) -> list[dict]:
    """`"a<image>b"` -> `[{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]`
    (empty text segments left out): the images go exactly where the placeholders were."""
    content: list[dict] = []
    for i, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if segment:
            content.append({"type": "text", "text": segment})
    return content


def build_prompt(row: RLRow, processor, system_prompt: str | None = None) -> RolloutPrompt:
    """The chat-templated prompt of a row (generation prompt appended) and its images.

    `system_prompt=None` adds no system message (the template's default, if any, applies: Vision-R1
    PTST); pass `R1_ZERO_SYSTEM_PROMPT` for Vision-R1-Zero.
    """
    if row.problem.count(IMAGE_PLACEHOLDER) != len(row.images):
        raise ValueError(
            f"row {row.index}: {row.problem.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders for "
            f"{len(row.images)} images; load rows with load_rl_rows, which skips such rows"
        )
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": placeholder_content(row.problem)})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return RolloutPrompt(text=text, images=list(row.images))


# ------------------------------------------------------------------------------------ order

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """Batches of `prompts_per_step` rows in a seeded shuffled order, epoch after epoch, forever.

    Every epoch is a fresh permutation, a pure function of (seed, epoch). A batch that crosses an
    epoch end is completed from the next epoch, so every batch has exactly `prompts_per_step` rows.
    `state_dict()` / `load_state_dict()` (epoch, position, seed, num_rows) make a resumed run
    continue with exactly the batches the interrupted one would have drawn.
    """

    def __init__(self, rows: Sequence[T], prompts_per_step: int, seed: int):
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step ({prompts_per_step}) must be >= 1")
        if len(rows) < prompts_per_step:
            raise ValueError(
                f"the data has {len(rows)} usable rows, fewer than prompts_per_step ({prompts_per_step}); "
                "lower rollout.prompts_per_step or add data"
            )
        self.rows = rows
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.epoch = 0
        """The epoch the next row comes from."""
        self.position = 0
        """Index of the next row in this epoch's permutation."""
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"megatron-vr1-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[T]:
        batch = []
        while len(batch) < self.prompts_per_step:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.prompts_per_step - len(batch), len(self._order) - self.position)
            batch.extend(self.rows[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != len(self.rows):
            raise ValueError(
                f"the saved sampler state is for {state['num_rows']} rows but the data now has {len(self.rows)}; "
                "resume with the same data file (and the same bad-row filtering)"
            )
        if not 0 <= state["position"] <= len(self.rows):
            raise ValueError(f"sampler state position ({state['position']}) is outside 0..{len(self.rows)}")
        if state["seed"] != self.seed:
            logger.warning("resuming the prompt order of seed %s (saved state) instead of seed %s",
                           state["seed"], self.seed)
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)
