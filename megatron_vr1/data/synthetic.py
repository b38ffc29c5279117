"""The tiny default task (docs/cpu.md, "The tiny task and model"): count the red shapes in a 112x112 picture.

Each picture holds 1-5 shapes (circle / square; red / blue / green; 12-20 px), each inside its own
cell of a 4x4 grid of 28x28 cells -- one merged vision token per cell, 16 image tokens per image.
The question is always "How many red shapes are there?"; the red count (the answer) is drawn
uniformly from 0-4 first, then the total from max(1, red)..5. The cold-start CoT names the shapes
in reading order (row by row):
`<think>I see a red square, a green circle. Red shapes: 1.</think><answer>1</answer>`.

`write_synthetic` writes, into one folder:

* `rl_train.parquet`, `rl_val.parquet`, `rl_test.parquet`: the Vision-R1-rl (geometry3k) schema --
  `images` (list of {"bytes": PNG, "path": None}, stored with the Hugging Face `Sequence(Image())`
  feature metadata so `datasets.load_dataset("parquet", ...)` decodes them to PIL images),
  `problem` ("<image>\\nHow many red shapes are there?"), `answer` ("0".."4");
* `coldstart_sft.jsonl` (LLaVA-CoT cold-start format) with its PNGs under `images/`.

The RL `problem` and the SFT user turn are the same text, so the RL prompts look exactly like the
prompts the cold start trained on. Every problem is a pure function of (seed, split, position), and
the splits are disjoint by *layout* -- the set of (cell, shape, colour) -- so a held-out picture is
never a jittered copy of a training one. Splits are drawn in the order test, val, train, sft, each
from its own generator, so the test set does not change when n_train does.

Imperfect cold start (`cold_start="imperfect"`, for the ablation in docs/ablation.md): the SFT rows
are written as a weaker process would, while the RL parquets (and their answers) stay exact.

* `wrong_rate` of the rows reach a wrong conclusion: the think text overlooks the bottom row of the
  grid (its shapes are left out of the list, so its red shapes are not counted) and the answer
  follows the think text. The error is a systematic blind spot, not noise: it is given first to
  rows with a red shape in the bottom row (about 41 % of pictures), so with wrong_rate above ~0.2
  most such pictures are answered wrongly and a model that imitates the data well learns the blind
  spot (greedy decoding follows the majority), while a reward on the answer can remove it. Only
  when wrong_rate exceeds that share are other rows made wrong too (count off by one).
* `overthink_rate` of the rows "overthink": 2-3 repeated re-check sentences (`Again:
  red shapes: N.`, ~13 tokens each) before `</think>`, given first to busy pictures (4-5 shapes, ~59 %).

Both rates are exact: round(rate * n_sft) rows each, picked by a generator of their own, so the
pictures are the same as in the perfect data. The default (`cold_start="perfect"`) output is
unchanged.

CLI: `python -m megatron_vr1.data.synthetic --out DIR [--n-train 2000 --n-val 200 --n-test 200
--n-sft 2000 --seed 0] [--cold-start imperfect --wrong-rate 0.3 --overthink-rate 0.4]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

IMAGE_SIZE = 112
GRID = 4
CELL = IMAGE_SIZE // GRID  # 28 px: one 2x2-merged group of 14 px patches
MIN_SHAPE_PX, MAX_SHAPE_PX = 12, 20
MAX_SHAPES = 5
MAX_RED = 4
KINDS = ("circle", "square")
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50)}
BACKGROUND = (255, 255, 255)
QUESTION = "How many red shapes are there?"
PROBLEM = "<image>\n" + QUESTION
"""The RL `problem` text and the SFT user turn (LLaVA style: the placeholder, a newline, the question)."""

SPLITS = ("test", "val", "train", "sft")
"""Drawing order: earlier splits claim their layouts first."""


@dataclass(frozen=True)
class Shape:
    kind: str
    """"circle" or "square"."""
    color: str
    """"red", "blue" or "green"."""
    row: int
    col: int
    """Grid cell (0-3, 0-3)."""
    size: int
    """Side / diameter in pixels (12-20)."""
    x: int
    y: int
    """Top-left corner in image pixels (the shape lies inside its cell)."""


class Problem(NamedTuple):
    image: Image.Image
    question: str
    answer: str
    """The red count as a string ("0".."4"), like every RL answer."""
    shapes: list[Shape]
    """In reading order (row by row, left to right)."""


def layout_key(shapes: list[Shape]) -> tuple:
    """What makes two pictures the same problem: the set of (cell, kind, colour); size and jitter ignored."""
    return tuple(sorted((s.row, s.col, s.kind, s.color) for s in shapes))


def draw(shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        box = (s.x, s.y, s.x + s.size - 1, s.y + s.size - 1)
        if s.kind == "circle":
            pen.ellipse(box, fill=COLORS[s.color])
        else:
            pen.rectangle(box, fill=COLORS[s.color])
    return image


def make_problem(rng: random.Random) -> Problem:
    """One problem drawn from `rng` (a `random.Random`; the same state gives the same problem)."""
    red = rng.randint(0, MAX_RED)
    total = rng.randint(max(red, 1), MAX_SHAPES)
    cells = rng.sample(range(GRID * GRID), total)
    colors = ["red"] * red + [rng.choice(("blue", "green")) for _ in range(total - red)]
    shapes = []
    for cell, color in zip(cells, colors):
        size = rng.randint(MIN_SHAPE_PX, MAX_SHAPE_PX)
        row, col = divmod(cell, GRID)
        x = col * CELL + rng.randint(0, CELL - size)
        y = row * CELL + rng.randint(0, CELL - size)
        shapes.append(Shape(rng.choice(KINDS), color, row, col, size, x, y))
    shapes.sort(key=lambda s: (s.row, s.col))
    return Problem(draw(shapes), QUESTION, str(red), shapes)


def cot_response(shapes: list[Shape], answer: int | str) -> str:
    """The cold-start target: `<think>I see a red square, a green circle. Red shapes: 1.</think><answer>1</answer>`."""
    seen = ", ".join(f"a {s.color} {s.kind}" for s in shapes) if shapes else "no shapes"
    return f"<think>I see {seen}. Red shapes: {answer}.</think><answer>{answer}</answer>"


RECHECK = "Again: red shapes: {n}."
"""An overthinking sentence of the imperfect cold start (never in the perfect rows)."""
COLD_STARTS = ("perfect", "imperfect")


def imperfect_response(shapes: list[Shape], answer: int | str, wrong: bool, overthink: int,
                       rng: random.Random | None = None) -> tuple[str, int]:
    """The weaker process's CoT for one picture, and the answer it concludes.

    wrong: overlook the bottom grid row (if that changes nothing, i.e. no red shape there, the
    count is off by one instead, drawn from `rng`); overthink: that many re-check sentences.
    """
    answer = int(answer)
    said = shapes
    if wrong:
        said = [s for s in shapes if s.row != GRID - 1]
        concluded = sum(s.color == "red" for s in said)
        if concluded == answer:  # no red shape in the bottom row: a plain miscount
            said = shapes
            step = (rng or random).choice((-1, 1))
            concluded = answer + step if 0 <= answer + step <= MAX_RED else answer - step
    else:
        concluded = answer
    seen = ", ".join(f"a {s.color} {s.kind}" for s in said) if said else "no shapes"
    checks = "".join(" " + RECHECK.format(n=concluded) for _ in range(overthink))
    text = f"<think>I see {seen}. Red shapes: {concluded}.{checks}</think><answer>{concluded}</answer>"
    return text, concluded


def _pick(n: int, preferred: list[int], k: int, rng: random.Random) -> set[int]:
    """k of range(n): a random subset of `preferred` first, then random others."""
    k = min(max(k, 0), n)
    first = set(rng.sample(preferred, min(k, len(preferred))))
    rest = [i for i in range(n) if i not in first]
    return first | set(rng.sample(rest, k - len(first)))


def imperfect_plan(problems: list[Problem], wrong_rate: float, overthink_rate: float,
                   seed: int) -> list[tuple[bool, int]]:
    """(wrong, number of re-check sentences) per SFT row; see the module docstring."""
    for name, rate in (("wrong_rate", wrong_rate), ("overthink_rate", overthink_rate)):
        if not 0 <= rate <= 1:
            raise ValueError(f"{name} ({rate}) must be in [0, 1]")
    rng = random.Random(f"megatron-vr1-synthetic:{seed}:imperfect-coldstart")
    n = len(problems)
    blind = [i for i, p in enumerate(problems) if any(s.row == GRID - 1 and s.color == "red" for s in p.shapes)]
    busy = [i for i, p in enumerate(problems) if len(p.shapes) >= 4]
    wrong = _pick(n, blind, round(wrong_rate * n), rng)
    over = _pick(n, busy, round(overthink_rate * n), rng)
    return [(i in wrong, rng.randint(2, 3) if i in over else 0) for i in range(n)]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _draw_split(split: str, n: int, seed: int, taken: set) -> list[Problem]:
    """`n` problems whose layouts are not in `taken` (which is updated); one generator per split."""
    rng = random.Random(f"megatron-vr1-synthetic:{seed}:{split}")
    problems: list[Problem] = []
    attempts, max_attempts = 0, 100 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could not draw {n} distinct {split} problems in {max_attempts} attempts")
        problem = make_problem(rng)
        key = layout_key(problem.shapes)
        if key not in taken:
            taken.add(key)
            problems.append(problem)
    return problems


def draw_splits(n_train: int, n_val: int, n_test: int, n_sft: int, seed: int) -> dict[str, list[Problem]]:
    """The four disjoint splits, by name (see the module docstring for the drawing order)."""
    sizes = {"train": n_train, "val": n_val, "test": n_test, "sft": n_sft}
    for name, n in sizes.items():
        if n < 0:
            raise ValueError(f"n_{name} ({n}) must be >= 0")
    taken: set = set()
    return {split: _draw_split(split, sizes[split], seed, taken) for split in SPLITS}


# --------------------------------------------------------------------------------------- writing


def _hf_features_metadata() -> bytes:
    # The feature metadata `datasets` writes for Sequence(Image()) (read as List(Image()) by
    # datasets >= 4, and by the older versions GPU images may ship); without it `datasets`
    # would return the raw {"bytes", "path"} structs instead of images.
    features = {
        "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
        "problem": {"dtype": "string", "_type": "Value"},
        "answer": {"dtype": "string", "_type": "Value"},
    }
    return json.dumps({"info": {"features": features}}).encode()


def _atomic_path(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, final: Path) -> None:
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600 files
    os.replace(tmp, final)


def write_rl_parquet(path: Path, problems: list[Problem]) -> None:
    """The Vision-R1-rl schema, written to a temporary name and renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("images", pa.list_(image_type)), ("problem", pa.string()), ("answer", pa.string())],
        metadata={b"huggingface": _hf_features_metadata()},
    )
    table = pa.table(
        {
            "images": [[{"bytes": png_bytes(p.image), "path": None}] for p in problems],
            "problem": [PROBLEM for _ in problems],
            "answer": [p.answer for p in problems],
        },
        schema=schema,
    )
    tmp = _atomic_path(path)
    try:
        pq.write_table(table, tmp)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_sft_jsonl(out: Path, problems: list[Problem], jsonl_name: str = "coldstart_sft.jsonl",
                    image_dir: str = "images", responses: list[str] | None = None) -> None:
    """LLaVA-CoT rows + PNGs. The image folder is built aside and swapped in before the JSONL is
    renamed into place, so the JSONL never names a missing image. `responses`: the assistant turns
    (default: the perfect `cot_response` of each problem)."""
    if responses is not None and len(responses) != len(problems):
        raise ValueError(f"{len(responses)} responses for {len(problems)} problems")
    images_final = out / image_dir
    images_tmp = Path(tempfile.mkdtemp(prefix=f".{image_dir}.tmp-", dir=out))
    jsonl_final = out / jsonl_name
    jsonl_tmp = _atomic_path(jsonl_final)
    try:
        lines = []
        for i, p in enumerate(problems):
            name = f"sft_{i:06d}.png"
            (images_tmp / name).write_bytes(png_bytes(p.image))
            row = {
                "id": f"synthetic-sft-{i:06d}",
                "image": f"{image_dir}/{name}",
                "conversations": [
                    {"from": "human", "value": PROBLEM},
                    {"from": "gpt", "value": cot_response(p.shapes, p.answer) if responses is None
                     else responses[i]},
                ],
            }
            lines.append(json.dumps(row))
        jsonl_tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        images_tmp.chmod(0o777 & ~_umask())
        if images_final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{image_dir}.old-", dir=out))
            os.replace(images_final, old / image_dir)
            os.replace(images_tmp, images_final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(images_tmp, images_final)
        _publish(jsonl_tmp, jsonl_final)
    except BaseException:
        shutil.rmtree(images_tmp, ignore_errors=True)
        jsonl_tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@dataclass(frozen=True)
class SyntheticFiles:
    train: Path
    val: Path
    test: Path
    sft: Path
    """The cold-start JSONL; its image paths are relative to its folder."""
    image_dir: Path


def write_synthetic(out_dir, n_train: int = 2000, n_val: int = 200, n_test: int = 200, n_sft: int = 2000,
                    seed: int = 0, cold_start: str = "perfect", wrong_rate: float = 0.3,
                    overthink_rate: float = 0.4) -> SyntheticFiles:
    """Write the RL parquets and the cold-start JSONL + images into `out_dir` (created if needed).

    cold_start: "perfect" (every CoT right and short) or "imperfect" (wrong_rate of the rows conclude
    wrongly, overthink_rate overthink; the rates are unused with "perfect"). Existing files of the
    same names are replaced atomically; other files are left alone.
    """
    if cold_start not in COLD_STARTS:
        raise ValueError(f"cold_start ({cold_start!r}) must be one of {', '.join(COLD_STARTS)}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; pick another output folder")
    out.mkdir(parents=True, exist_ok=True)
    splits = draw_splits(n_train, n_val, n_test, n_sft, seed)
    files = SyntheticFiles(out / "rl_train.parquet", out / "rl_val.parquet", out / "rl_test.parquet",
                           out / "coldstart_sft.jsonl", out / "images")
    write_rl_parquet(files.train, splits["train"])
    write_rl_parquet(files.val, splits["val"])
    write_rl_parquet(files.test, splits["test"])
    responses = None
    if cold_start == "imperfect":
        plan = imperfect_plan(splits["sft"], wrong_rate, overthink_rate, seed)
        rng = random.Random(f"megatron-vr1-synthetic:{seed}:imperfect-miscount")
        responses = [imperfect_response(p.shapes, p.answer, wrong, over, rng)[0]
                     for p, (wrong, over) in zip(splits["sft"], plan)]
    write_sft_jsonl(out, splits["sft"], responses=responses)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_vr1.data.synthetic",
        description="Write the tiny red-shape counting task (RL parquets + cold-start JSONL).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-sft", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold-start", choices=COLD_STARTS, default="perfect",
                        help="imperfect: a share of wrong conclusions and of overthinking in the SFT rows")
    parser.add_argument("--wrong-rate", type=float, default=0.3, help="imperfect: share of wrong conclusions")
    parser.add_argument("--overthink-rate", type=float, default=0.4, help="imperfect: share of overthinking rows")
    args = parser.parse_args(argv)
    try:
        files = write_synthetic(args.out, args.n_train, args.n_val, args.n_test, args.n_sft, args.seed,
                                args.cold_start, args.wrong_rate, args.overthink_rate)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(files.train.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
