"""Cold-start SFT rows: loading the three formats, tokenising with an assistant-only loss mask, packing.

Formats (docs/method.md, "Data rows"); a file is a JSON array or JSON Lines (told apart by its first
character), and each row may be in any of them:

* LLaVA-CoT: `{"id", "image": path, "conversations": [{"from": "human"|"gpt", "value"}]}`;
* Mulberry: `{"images": [paths], "conversations": [{"from": "user"|"assistant", "value"}]}`;
* OpenVLThinker: `{"messages": [{"role", "content"}], "images": [paths]}`.

All become an `SFTRow`: `messages` as `{"role": "system"|"user"|"assistant", "content": str}` with
`<image>` placeholders kept in the text, and `images` as resolved paths (relative paths are relative
to `image_root`, by default the data file's folder). Images are checked at load (the file exists and
PIL recognises it) but decoded only by `encode_sft`: the real cold-start set has ~200K images.

Bad rows are counted by reason, logged in one summary line and skipped (docs/design.md, "Bad input"):
`invalid_json`, `unknown_format` (neither `conversations` nor `messages`), `bad_conversation`
(unknown role, non-text content, no user -> assistant alternation, or not ending with an assistant
turn), `empty_response`, `missing_image`, `undecodable_image`, `placeholder_mismatch` (count of
`<image>` in the system/user turns != number of images; in assistant text it stays literal text).
Text-only rows (no image, no placeholder) are valid.
`encode_sft_rows` also drops rows longer than `max_length` (`too_long`): truncating would cut image
tokens or the answer, so a long row is never shortened.

The loss mask is 1 on each assistant turn's content and its closing `<|im_end|>`, 0 on the
`<|im_start|>assistant\\n` header, the newline after `<|im_end|>`, and all system/user tokens. The
spans come from the chat template itself: the text templated up to each assistant turn (with the
generation prompt) and up to its end are tokenised and must be token prefixes of the whole
conversation; a template that breaks this (e.g. one that rewrites earlier turns) is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from megatron_vr1.data.bad_rows import BadRow, LoadResult, SkipReport
from megatron_vr1.data.rl_dataset import IMAGE_PLACEHOLDER, placeholder_content

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""Role names of the three formats -> chat-template roles."""
END_OF_TURN = "<|im_end|>"


@dataclass
class SFTRow:
    messages: list[dict[str, str]]
    """`{"role", "content"}` turns: optional system, then user/assistant alternating, ending with assistant."""
    images: list[Path]
    """Image files, in placeholder order."""
    index: int = field(default=-1, compare=False)
    """Position of the row in its file (0-based, blank lines not counted)."""
    id: str = field(default="", compare=False)
    """The row's `id` if it has one."""


@dataclass
class SFTExample:
    input_ids: list[int]
    """Token ids, image pads expanded (one per merged vision token)."""
    loss_mask: list[int]
    """1 on assistant content + its `<|im_end|>`, else 0; same length as input_ids."""
    pixel_values: torch.Tensor | None
    """Processor output, (patches, channels*temporal*patch*patch); None without images."""
    image_grid_thw: torch.Tensor | None
    """(images, 3) grid of each image in patches; None without images."""
    index: int = -1
    """The source row's index."""

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class SequenceTooLong(BadRow):
    def __init__(self, length: int, max_length: int):
        super().__init__("too_long", f"{length} tokens > max_length {max_length}")
        self.length = length


# ------------------------------------------------------------------------------------ loading


def _turns(record: dict) -> list[dict[str, str]]:
    if "messages" in record:
        raw = record["messages"]
    elif "conversations" in record:
        raw = record["conversations"]
    else:
        raise BadRow("unknown_format", f"no 'conversations' or 'messages' key (keys: {sorted(record)[:8]})")
    if not isinstance(raw, list) or not raw:
        raise BadRow("bad_conversation", "the turn list is empty or not a list")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict):
            raise BadRow("bad_conversation", f"a turn is a {type(turn).__name__}, not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES:
            raise BadRow("bad_conversation", f"unknown role {role!r} (known: {sorted(ROLES)})")
        if not isinstance(content, str):
            raise BadRow("bad_conversation", f"{role} content is a {type(content).__name__}, not text")
        messages.append({"role": ROLES[role], "content": content})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(body) // 2)
    if [m["role"] for m in body] != expected or not body:
        raise BadRow("bad_conversation", f"roles {[m['role'] for m in messages]}: need user/assistant pairs")
    if any(not m["content"].strip() for m in body if m["role"] == "assistant"):
        raise BadRow("empty_response")
    return messages


def _image_paths(record: dict, image_root: Path) -> list[Path]:
    refs = record.get("images", record.get("image"))
    if refs is None:
        refs = []
    elif isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise BadRow("missing_image", f"image field {refs!r:.80} is not a path or a list of paths")
    paths = []
    for ref in refs:
        path = Path(ref) if Path(ref).is_absolute() else image_root / ref
        if not path.is_file():
            raise BadRow("missing_image", f"{path} does not exist")
        try:
            with Image.open(path):  # reads the header only
                pass
        except Exception as exc:
            raise BadRow("undecodable_image", f"{path}: {type(exc).__name__}: {exc}") from None
        paths.append(path)
    return paths


def parse_sft_record(record: Any, image_root: Path, index: int = -1) -> SFTRow:
    """One row of any of the three formats -> `SFTRow` (raises `BadRow`)."""
    if not isinstance(record, dict):
        raise BadRow("unknown_format", f"the row is a {type(record).__name__}, not an object")
    messages = _turns(record)
    images = _image_paths(record, image_root)
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] != "assistant")
    if placeholders != len(images):
        raise BadRow("placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} for {len(images)} images")
    return SFTRow(messages=messages, images=images, index=index, id=str(record.get("id", "")))


def _records(path: Path):
    """(index, record or BadRow) for a JSON array or a JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path} starts with '[' but is not valid JSON ({exc}); fix the file or write JSON Lines"
            ) from None
        yield from enumerate(records)
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, BadRow("invalid_json", f"line {lineno}: {exc}")
        index += 1


def load_sft_data(path, image_root=None) -> LoadResult[SFTRow]:
    """`load_sft_rows` plus its `SkipReport`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist; check sft.data_path")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a folder; check sft.image_root")
    rows: list[SFTRow] = []
    report = SkipReport(path)
    for index, record in _records(path):
        try:
            if isinstance(record, BadRow):
                raise record
            rows.append(parse_sft_record(record, root, index))
            report.kept += 1
        except BadRow as bad:
            report.add(index, bad)
    report.log(logger)
    report.raise_if_all_bad()
    return LoadResult(rows, report)


def load_sft_rows(path, image_root=None) -> list[SFTRow]:
    """The good rows of a cold-start JSON / JSONL file (bad ones counted, logged once, skipped)."""
    return load_sft_data(path, image_root).rows


# ------------------------------------------------------------------------------------ encoding


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as exc:
        raise BadRow("undecodable_image", f"{path}: {type(exc).__name__}: {exc}") from None


def _chat(messages: list[dict[str, str]]) -> list[dict]:
    """Chat-template messages: user turns (and a system turn with a placeholder) become content
    lists with the images where the placeholders were -- exactly as `build_prompt` renders an RL
    prompt, so RL prompts look like the cold-start prompts. Assistant text stays a string."""
    out = []
    for m in messages:
        as_list = m["role"] == "user" or (m["role"] == "system" and IMAGE_PLACEHOLDER in m["content"])
        out.append({"role": m["role"], "content": placeholder_content(m["content"]) if as_list else m["content"]})
    return out


def encode_sft(row: SFTRow, processor, max_length: int) -> SFTExample:
    """Tokenise a row with the processor's chat template; loss on assistant tokens only.

    Raises `SequenceTooLong` (a `BadRow`, reason "too_long") when the sequence exceeds
    `max_length`, and `BadRow("undecodable_image")` for an image that does not decode.
    """
    images = [_load_image(p) for p in row.images]
    chat = _chat(row.messages)
    full_text = processor.apply_chat_template(chat, tokenize=False)
    encoded = processor(text=[full_text], images=images or None, return_tensors="pt")
    input_ids = encoded["input_ids"][0].tolist()
    if len(input_ids) > max_length:
        raise SequenceTooLong(len(input_ids), max_length)
    grid = encoded.get("image_grid_thw") if images else None
    pixel_values = encoded.get("pixel_values") if images else None

    tokenizer = processor.tokenizer
    image_token = processor.image_token
    merge = processor.image_processor.merge_size
    pads = [int(n) // (merge * merge) for n in grid.prod(-1).tolist()] if grid is not None else []
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def ids_of(text: str) -> list[int]:
        parts = text.split(image_token)
        expanded = parts[0] + "".join(image_token * pads[i] + part for i, part in enumerate(parts[1:]))
        return tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def check_prefix(ids: list[int], what: str) -> None:
        if input_ids[: len(ids)] != ids:
            raise RuntimeError(
                f"row {row.index}: the chat template's {what} does not tokenise to a prefix of the whole "
                "conversation, so the assistant spans cannot be located; use a template that renders "
                "earlier turns unchanged (Qwen2.5-VL's does)"
            )

    check_prefix(ids_of(full_text), "full text (with image pads expanded)")
    loss_mask = [0] * len(input_ids)
    for k, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        start_ids = ids_of(processor.apply_chat_template(chat[:k], tokenize=False, add_generation_prompt=True))
        upto_ids = ids_of(processor.apply_chat_template(chat[: k + 1], tokenize=False))
        check_prefix(start_ids, f"text before assistant turn {k}")
        check_prefix(upto_ids, f"text up to the end of assistant turn {k}")
        ends = [i for i in range(len(start_ids), len(upto_ids)) if upto_ids[i] == end_id]
        if not ends:
            raise RuntimeError(
                f"row {row.index}: assistant turn {k} has no {END_OF_TURN} in the chat template's output"
            )
        for i in range(len(start_ids), ends[-1] + 1):
            loss_mask[i] = 1
    return SFTExample(input_ids, loss_mask, pixel_values, grid, row.index)


def encode_sft_rows(
    rows: Sequence[SFTRow], processor, max_length: int, source: str = "SFT rows"
) -> LoadResult[SFTExample]:
    """`encode_sft` over rows; too-long and undecodable rows are counted, logged once and skipped."""
    if max_length < 1:
        raise ValueError(f"max_length ({max_length}) must be >= 1, e.g. sft.max_length: 16384")
    examples: list[SFTExample] = []
    report = SkipReport(source)
    for row in rows:
        try:
            examples.append(encode_sft(row, processor, max_length))
            report.kept += 1
        except BadRow as bad:
            report.add(row.index, bad)
    report.log(logger, "examples")
    report.raise_if_all_bad("examples")
    return LoadResult(examples, report)


# ------------------------------------------------------------------------------------ packing


def pack_lengths(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into bins of total <= max_tokens.

    Longest first (ties by index); each goes into the lowest-numbered bin with room. Bins are in
    the order they were opened, indices ascending within a bin. O(n log n) via a max segment tree
    over bins' remaining room, so 200K examples pack in a second or two.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens ({max_tokens}) must be >= 1")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_tokens:
            raise ValueError(
                f"example {i} has {n} tokens, outside 1..max_tokens ({max_tokens}); drop long rows first "
                "(encode_sft_rows does) or raise max_tokens"
            )
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [0] * size + [max_tokens] * size  # leaves: every bin (opened or not) starts empty
    for node in range(size - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost leaf with room >= need
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return [sorted(b) for b in bins]


def pack_examples(examples: Sequence[SFTExample], max_tokens: int) -> list[list[SFTExample]]:
    """Greedy sequence packing (first-fit decreasing) into bins of at most `max_tokens` tokens."""
    return [[examples[i] for i in b] for b in pack_lengths([e.num_tokens for e in examples], max_tokens)]
