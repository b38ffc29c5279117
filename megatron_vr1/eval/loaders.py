"""Benchmark loaders: each benchmark's published file format -> `EvalSample`s.

Everything is read from local files (nothing is downloaded). `--data DIR` holds one folder per
benchmark (`DIR/mathvista/`, ... or the published folder names `MathVista`, `MathVerse`, `MM_Math`,
`MathVision`, `DynaMath`); a benchmark whose folder is missing is looked for in DIR itself.
`--file BENCH=PATH` names a file directly. Images are paths relative to the data file's folder
(also tried under `images/`), or Hugging Face `Image` cells (`{"bytes", "path"}`) in parquet.

Schemas (the fields read; others are ignored):

- MathVista testmini: `testmini.json` (dict pid -> row), `.jsonl`, or HF `testmini-*.parquet`;
  pid, question, image / decoded_image, choices, unit, precision, answer, question_type
  (multi_choice / free_form), answer_type (text / integer / float / list), query, metadata.task,
  metadata.skills.
- MathVerse testmini: `testmini.json` (a list); sample_index, problem_version, question, image
  ("" for Text Only), answer, question_type (multi-choice / free-form), query_cot, metadata.subject.
- MM-Math: `MM_Math.json(l)` / `mm_math.json(l)`; question, file_name, solution (the answer is its
  last `\\boxed{}`) or answer, year, difficult, knowledge.
- MathVision: `testmini.jsonl` or `test.jsonl`; id, question, options, image, answer, level, subject.
- DynaMath: every `sample_variant*.json` (one file per variant, dict qid -> row) or rows with
  qid / varid; question, image, answer / ground_truth, answer_type (multiple choice / float /
  text), subject, level / knowledge_level.

Prompts (the papers' own query text where the benchmark publishes one): MathVista `query` (its
hint + question + choices; rebuilt from the same template when absent), MathVerse `query_cot`,
MathVision question + "Choices: (A) ..", MM-Math and DynaMath the question. The image goes first
(Qwen2.5-VL's usual layout); no system prompt unless asked for (Vision-R1 uses none).

A malformed row (missing question or answer, unknown question type, a multiple-choice answer
that is not among its choices, an unreadable image) raises `ValueError` naming the file, the row
and the fix; with `skip_bad_rows=True` such rows are counted and left out instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_vr1.data.bad_rows import BadRow
from megatron_vr1.rewards.answer import last_boxed

IMAGE = "<image>"
"""Placeholder for one image in `EvalSample.prompt` (as in the RL data)."""
LETTERS = "ABCDEFGH"

ImageRef = Path | bytes
"""An image file, or the encoded bytes of one (parquet cells)."""


@dataclass
class EvalSample:
    bench: str
    id: str
    prompt: str
    """User text with one `<image>` placeholder per image."""
    images: list[ImageRef]
    answer: str
    """The ground truth as published (MathVista multiple choice: the choice text)."""
    kind: str
    """How it is scored: choice | integer | float | list | text | expr."""
    question: str
    """The bare question (for the judge and the records)."""
    choices: list[str] | None = None
    """Option texts in letter order A, B, ... (multiple choice)."""
    tolerance: float | None = None
    """Absolute tolerance of numeric answers (MM-Math 1e-2, DynaMath 1e-3)."""
    precision: int | None = None
    """Decimal places a float answer is rounded to before comparing (MathVista)."""
    unit: str | None = None
    """A unit the prediction may carry (MathVista)."""
    categories: dict[str, list[str]] = field(default_factory=dict)
    """Category name -> the values this sample counts under (a sample may have several skills)."""
    group: str | None = None
    """DynaMath seed question (worst-case accuracy is over the variants of one seed)."""

    @property
    def answer_letter(self) -> str | None:
        """The correct option letter of a multiple-choice sample."""
        if self.kind != "choice":
            return None
        truth = self.answer.strip().strip("()").strip()
        if len(truth) == 1 and truth in LETTERS:
            return truth
        if self.choices and self.answer in self.choices:
            return LETTERS[self.choices.index(self.answer)]
        return None

    @property
    def answer_text(self) -> str | None:
        """The text of the correct option (multiple choice with known options)."""
        letter = self.answer_letter
        if letter and self.choices and LETTERS.index(letter) < len(self.choices):
            return self.choices[LETTERS.index(letter)]
        return None


@dataclass
class LoadedBenchmark:
    name: str
    files: list[Path]
    samples: list[EvalSample]
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows left out by reason (only with skip_bad_rows)."""


# ----------------------------------------------------------------------------- reading files


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(key, row) pairs of a .json (a list, or a dict keyed by id), .jsonl or .parquet file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append((str(n - 1), json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not JSON ({e.msg}); fix or remove the line") from None
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, list):
                return [(str(i), row) for i, row in enumerate(data)]
            if isinstance(data, dict):
                return [(str(k), row) for k, row in data.items()]
            raise ValueError(
                f"{path}: expected a JSON list of rows or an object keyed by id, got {type(data).__name__}")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(str(i), row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-download the file") from None
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet")


def _image_ref(cell: Any, base: Path, required: bool = True) -> list[ImageRef]:
    """An image cell (relative path, HF `{"bytes", "path"}` dict or bytes) -> [ref], checked."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        if required:
            raise BadRow("missing_image", "no image")
        return []
    if isinstance(cell, (bytes, bytearray)):
        ref: ImageRef = bytes(cell)
    elif isinstance(cell, str):
        candidates = [Path(cell)] if Path(cell).is_absolute() else [base / cell, base / "images" / cell]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise BadRow("missing_image", f"image {cell!r} not found (looked for {', '.join(map(str, candidates))})")
        ref = found
    else:
        raise BadRow("missing_image", f"image cell of type {type(cell).__name__}")
    _check_image(ref)
    return [ref]


def _check_image(ref: ImageRef) -> None:
    """Opens the image header (cheap): catches a truncated download or a non-image file now."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
            image.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ...
        where = "image bytes" if isinstance(ref, bytes) else str(ref)
        raise BadRow("undecodable_image", f"{where}: {type(e).__name__}: {e}") from None


def load_image(ref: ImageRef):
    """An `ImageRef` -> RGB PIL image (done at generation time, a batch at a time)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
        image.load()
        return image.convert("RGB")


def _text(row: dict, key: str, reason: str | None = None) -> str:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise BadRow(reason or f"missing_{key}", f"field {key!r} is missing or empty")
    return value.strip()


def _answer(row: dict, *keys: str) -> str:
    for key in keys:
        value = row.get(key)
        if isinstance(value, list):
            value = "[" + ", ".join(map(str, value)) + "]"
        if value is not None and str(value).strip():
            return str(value).strip()
    raise BadRow("missing_answer", f"field {' / '.join(map(repr, keys))} is missing or empty")


def _prompt(text: str, n_images: int) -> str:
    # a literal "<image>" in a question must not be taken for a placeholder
    return IMAGE * n_images + text.replace(IMAGE, "image")


_INLINE_CHOICE_RE = re.compile(r"\(([A-H])\)\s*(.*?)(?=\s*\([A-H]\)|\s*$)", re.DOTALL)
_LINE_CHOICE_RE = re.compile(r"^\s*\(?([A-H])\s*[:.)）]\s*(.+?)\s*$", re.MULTILINE)


def parse_choices(question: str) -> list[str] | None:
    """Option texts written in the question ("Choices: (A) yes (B) no", or lines "A: 12" / "B. 5"),
    in letter order from A; None when there are none or they are not A, B, C, ... in order."""
    marker = re.search(r"\b(?:choices?|options?)\s*:", question, re.IGNORECASE)
    tail = question[marker.end():] if marker else question
    for pattern in (_INLINE_CHOICE_RE, _LINE_CHOICE_RE):
        found = pattern.findall(tail)
        letters = [letter for letter, _ in found]
        if len(found) >= 2 and letters == list(LETTERS[: len(found)]):
            return [text.strip() for _, text in found]
    return None


# ----------------------------------------------------------------------------- MathVista

MATHVISTA_TASKS = {
    "figure question answering": "FQA", "geometry problem solving": "GPS", "math word problem": "MWP",
    "textbook question answering": "TQA", "visual question answering": "VQA",
}  # fmt: skip
MATHVISTA_SKILLS = {
    "algebraic reasoning": "ALG", "arithmetic reasoning": "ARI", "geometry reasoning": "GEO",
    "logical reasoning": "LOG", "numeric commonsense": "NUM", "scientific reasoning": "SCI",
    "statistical reasoning": "STA",
}  # fmt: skip


def mathvista_query(question: str, question_type: str, answer_type: str, precision: int | None,
                    choices: list[str] | None) -> str:
    """MathVista's published query (hint + question + choices), for files without `query`."""
    if question_type == "multi_choice":
        hint = "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    elif answer_type == "integer":
        hint = ("Please answer the question requiring an integer answer and provide the final value, "
                "e.g., 1, 2, 3, at the end.")
    elif answer_type == "float" and precision == 1:
        hint = ("Please answer the question requiring a floating-point number with one decimal place and provide "
                "the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    elif answer_type == "float":
        hint = ("Please answer the question requiring a floating-point number with two decimal places and provide "
                "the final value, e.g., 1.23, 1.34, 1.45, at the end.")
    elif answer_type == "list":
        hint = ("Please answer the question requiring a Python list as an answer and provide the final list, "
                "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    else:
        hint = "Please answer the question and provide the final answer at the end."
    text = f"Hint: {hint}\nQuestion: {question}"
    if choices:
        text += "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return text


def parse_mathvista(key: str, row: dict, base: Path) -> EvalSample:
    question = _text(row, "question", "missing_question")
    answer = _answer(row, "answer")
    qtype = row.get("question_type")
    atype = row.get("answer_type") or "text"
    if qtype not in ("multi_choice", "free_form"):
        raise BadRow("bad_question_type", f"question_type {qtype!r} is not 'multi_choice' or 'free_form'")
    if atype not in ("text", "integer", "float", "list"):
        raise BadRow("bad_answer_type", f"answer_type {atype!r} is not one of text, integer, float, list")
    choices = row.get("choices")
    if qtype == "multi_choice":
        if not isinstance(choices, list) or len(choices) < 2:
            raise BadRow("bad_choices", "a multi_choice row needs a list of choices")
        choices = [str(c) for c in choices]
        if answer not in choices and not (len(answer) == 1 and answer in LETTERS[: len(choices)]):
            raise BadRow("answer_not_a_choice", f"answer {answer!r} is not one of the choices {choices}")
    else:
        choices = None
    precision = row.get("precision")
    if atype == "float" and precision is None:
        precision = len(answer.split(".")[1]) if "." in answer else 0
    precision = int(precision) if precision is not None else None
    images = _image_ref(row.get("decoded_image") or row.get("image"), base)
    meta = row.get("metadata") or {}
    task = meta.get("task")
    categories = {}
    if task:
        categories["task"] = [MATHVISTA_TASKS.get(task, task)]
    if meta.get("skills"):
        categories["skill"] = [MATHVISTA_SKILLS.get(s, s) for s in meta["skills"]]
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        query = mathvista_query(question, qtype, atype, precision, choices)
    return EvalSample(
        bench="mathvista", id=str(row.get("pid", key)), prompt=_prompt(query.strip(), len(images)), images=images,
        answer=answer, kind="choice" if qtype == "multi_choice" else atype, question=question, choices=choices,
        precision=precision if atype == "float" else None, unit=(row.get("unit") or None), categories=categories,
    )


# ----------------------------------------------------------------------------- MathVerse


def parse_mathverse(key: str, row: dict, base: Path) -> EvalSample:
    # "Vision Only" rows carry the question in the image; their text is the query alone
    field_name = next((k for k in ("question", "query_wo", "query_cot") if isinstance(row.get(k), str)
                       and row[k].strip()), "question")
    question = _text(row, field_name, "missing_question")
    answer = _answer(row, "answer")
    qtype = row.get("question_type")
    if qtype not in ("multi-choice", "free-form"):
        raise BadRow("bad_question_type", f"question_type {qtype!r} is not 'multi-choice' or 'free-form'")
    version = row.get("problem_version") or "unknown"
    # "Text Only" rows publish no image; every other version needs one
    images = _image_ref(row.get("image"), base, required=version != "Text Only")
    choices = parse_choices(question) if qtype == "multi-choice" else None
    if qtype == "multi-choice" and not re.fullmatch(r"\(?[A-H]\)?", answer):
        raise BadRow("answer_not_a_letter", f"multi-choice answer {answer!r} is not an option letter")
    query = row.get("query_cot") if isinstance(row.get("query_cot"), str) and row["query_cot"].strip() else question
    meta = row.get("metadata") or {}
    categories = {"version": [version]}
    if meta.get("subject"):
        categories["subject"] = [meta["subject"]]
    return EvalSample(
        bench="mathverse", id=str(row.get("sample_index", key)), prompt=_prompt(query.strip(), len(images)),
        images=images, answer=answer, kind="choice" if qtype == "multi-choice" else "expr", question=question,
        choices=choices, categories=categories,
    )


# ----------------------------------------------------------------------------- MM-Math




MMMATH_TOLERANCE = 1e-2
"""MM-Math's outcome evaluation compares numbers with precision 1e-2 (docs/method.md, "Evaluation")."""


def parse_mmmath(key: str, row: dict, base: Path) -> EvalSample:
    question = _text(row, "question", "missing_question")
    if row.get("answer") not in (None, ""):
        answer = _answer(row, "answer")
    else:
        solution = row.get("solution")
        answer = last_boxed(solution) if isinstance(solution, str) else None
        if not answer:
            raise BadRow("missing_answer", "no 'answer' field and no \\boxed{} answer in 'solution'")
    images = _image_ref(row.get("file_name") or row.get("image"), base)
    categories = {}
    for name, field_name in (("difficulty", "difficult"), ("grade", "year")):
        if row.get(field_name):
            categories[name] = [str(row[field_name])]
    knowledge = row.get("knowledge")
    if knowledge:
        categories["knowledge"] = [str(k) for k in knowledge] if isinstance(knowledge, list) else [str(knowledge)]
    return EvalSample(
        bench="mmmath", id=str(row.get("id", key)), prompt=_prompt(question, len(images)), images=images,
        answer=answer, kind="expr", question=question, tolerance=MMMATH_TOLERANCE, categories=categories,
    )


# ----------------------------------------------------------------------------- MathVision

_MATHVISION_LEAD_RE = re.compile(r"^(?:\s*<image\d+>)+\s*")
_MATHVISION_TAG_RE = re.compile(r"\s*<image\d+>\s*")


def parse_mathvision(key: str, row: dict, base: Path) -> EvalSample:
    question = _text(row, "question", "missing_question")
    answer = _answer(row, "answer")
    options = row.get("options") or []
    if not isinstance(options, list):
        raise BadRow("bad_options", f"options must be a list, got {type(options).__name__}")
    options = [str(o) for o in options]
    if options and not (len(answer) == 1 and answer in LETTERS[: len(options)]):
        raise BadRow("answer_not_a_letter", f"answer {answer!r} is not one of the option letters of {options}")
    images = _image_ref(row.get("decoded_image") or row.get("image"), base)
    # "<image1>": the image goes first; a tag inside a sentence reads "the image"
    text = _MATHVISION_TAG_RE.sub(" the image ", _MATHVISION_LEAD_RE.sub("", question)).strip()
    if options:
        text += "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    categories = {}
    if row.get("subject"):
        categories["subject"] = [str(row["subject"])]
    if row.get("level") is not None:
        categories["level"] = [str(row["level"])]
    return EvalSample(
        bench="mathvision", id=str(row.get("id", key)), prompt=_prompt(text, len(images)), images=images,
        answer=answer, kind="choice" if options else "expr", question=question, choices=options or None,
        categories=categories,
    )


# ----------------------------------------------------------------------------- DynaMath

DYNAMATH_TOLERANCE = 1e-3
"""DynaMath publishes float answers to 4 decimals and accepts an absolute error of 1e-3."""
_DYNAMATH_TYPES = {"multiple choice": "choice", "float": "float", "text": "text"}


def parse_dynamath(key: str, row: dict, base: Path, variant: str = "1") -> EvalSample:
    question = _text(row, "question", "missing_question")
    answer = _answer(row, "answer", "ground_truth")
    atype = str(row.get("answer_type", "")).strip().lower()
    if atype not in _DYNAMATH_TYPES:
        raise BadRow("bad_answer_type",
                     f"answer_type {row.get('answer_type')!r} is not one of {sorted(_DYNAMATH_TYPES)}")
    kind = _DYNAMATH_TYPES[atype]
    choices = parse_choices(question) if kind == "choice" else None
    if kind == "choice" and not (len(answer) == 1 and answer in LETTERS):
        raise BadRow("answer_not_a_letter", f"multiple-choice answer {answer!r} is not an option letter")
    if kind == "float":
        try:
            float(answer)
        except ValueError:
            raise BadRow("bad_answer", f"float answer {answer!r} is not a number") from None
    images = _image_ref(row.get("decoded_image") or row.get("image"), base)
    qid = str(row.get("qid", key))
    variant = str(row.get("varid", variant))
    categories = {}
    if row.get("subject"):
        categories["subject"] = [str(row["subject"])]
    level = row.get("level") or row.get("knowledge_level")
    if level:
        categories["level"] = [str(level)]
    return EvalSample(
        bench="dynamath", id=f"{qid}-v{variant}", prompt=_prompt(question, len(images)), images=images,
        answer=answer, kind=kind, question=question, choices=choices,
        tolerance=DYNAMATH_TOLERANCE if kind == "float" else None, categories=categories, group=qid,
    )


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    folders: tuple[str, ...]
    """Folder names under --data, in order of preference."""
    files: tuple[str, ...]
    """Glob patterns of the data file, in order of preference, relative to the folder."""
    parse: Callable[..., EvalSample]
    all_files: bool = False
    """Every matching file is loaded (DynaMath: one file per variant)."""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("mathvista", "MathVista testmini", ("mathvista", "MathVista"),
                  ("testmini.json", "testmini.jsonl", "data/testmini.json", "testmini*.parquet",
                   "data/testmini*.parquet"),
                  parse_mathvista),
        Benchmark("mathverse", "MathVerse testmini", ("mathverse", "MathVerse"),
                  ("testmini.json", "testmini.jsonl"), parse_mathverse),
        Benchmark("mmmath", "MM-Math", ("mmmath", "mm_math", "MM_Math", "MM-Math"),
                  ("MM_Math.json", "MM_Math.jsonl", "mm_math.json", "mm_math.jsonl", "MM_Math/MM_Math.json",
                   "MM_Math/MM_Math.jsonl"), parse_mmmath),
        Benchmark("mathvision", "MathVision", ("mathvision", "MathVision", "MATH-V"),
                  ("testmini.jsonl", "data/testmini.jsonl", "test.jsonl", "data/test.jsonl", "testmini*.parquet",
                   "test*.parquet", "data/test*.parquet"), parse_mathvision),
        Benchmark("dynamath", "DynaMath", ("dynamath", "DynaMath"),
                  ("sample_variant*.json", "sample_variant*.parquet", "data/sample_variant*.parquet",
                   "*variant*.json"), parse_dynamath, all_files=True),
    )
}


def parse_bench_list(text: str) -> list[str]:
    """"mathvista,mathverse" -> names; an unknown or repeated name is a ValueError naming the valid ones."""
    names = [n.strip().lower().replace("-", "").replace("_", "") for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--bench {text!r} names no benchmark; use a comma-separated list of {', '.join(BENCHMARKS)}")
    for n in names:
        if n not in BENCHMARKS:
            raise ValueError(f"--bench: unknown benchmark {n!r}; choose from {', '.join(BENCHMARKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--bench {text!r} names a benchmark twice")
    return names


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_files(name: str, data: Path, file: Path | None = None) -> list[Path]:
    """The data file(s) of a benchmark: `file` if given, else the first pattern that matches."""
    bench = BENCHMARKS[name]
    if file is not None:
        if not file.is_file():
            raise FileNotFoundError(f"{name} data file {file} does not exist; fix --file {name}=PATH")
        return [file]
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} is not a directory; point it at the folder holding the benchmarks")
    folder = next((data / f for f in bench.folders if (data / f).is_dir()), data)
    for pattern in bench.files:
        found = sorted((p for p in folder.glob(pattern) if p.is_file()), key=_natural_key)
        if found:
            return found if bench.all_files else found[:1]
    raise FileNotFoundError(
        f"no {bench.title} data in {folder}: looked for {', '.join(bench.files)}; put the published files in "
        f"{data}/{bench.folders[0]}/ or name the file with --file {name}=PATH"
    )


def load_benchmark(name: str, data: str | Path, file: str | Path | None = None, limit: int | None = None,
                   skip_bad_rows: bool = False) -> LoadedBenchmark:
    """Reads and checks a benchmark; `limit` keeps the first N samples (DynaMath: N seed questions)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit ({limit}) must be >= 1")
    bench = BENCHMARKS[name]
    files = find_files(name, Path(data), Path(file) if file else None)
    samples: list[EvalSample] = []
    skipped: dict[str, int] = {}
    for variant, path in enumerate(files, start=1):
        for key, row in read_records(path):
            try:
                if not isinstance(row, dict):
                    raise BadRow("not_an_object", f"row is a {type(row).__name__}, not a JSON object")
                extra = {"variant": str(variant)} if name == "dynamath" else {}
                samples.append(bench.parse(key, row, path.parent, **extra))
            except BadRow as bad:
                if not skip_bad_rows:
                    raise ValueError(
                        f"{path}: row {key!r}: {bad.detail or bad.reason}; fix or remove the row, or pass "
                        "--skip-bad-rows to leave such rows out"
                    ) from None
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
    if not samples:
        raise ValueError(f"{name}: no usable rows in {', '.join(map(str, files))} (skipped: {skipped or 'none'})")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{name}: sample id {dup!r} occurs more than once in {', '.join(map(str, files))}; "
                         "ids must be unique")
    if limit is not None:
        if name == "dynamath":
            groups = list(dict.fromkeys(s.group for s in samples))[:limit]
            samples = [s for s in samples if s.group in set(groups)]
        else:
            samples = samples[:limit]
    return LoadedBenchmark(name, files, samples, skipped)
