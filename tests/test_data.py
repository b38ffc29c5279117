"""The data layer: synthetic task, RL rows / prompts / order, cold-start SFT rows / loss mask / packing."""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_vr1.data import synthetic
from megatron_vr1.data.rl_dataset import (
    R1_ZERO_SYSTEM_PROMPT,
    PromptSampler,
    RLRow,
    build_prompt,
    load_rl_data,
    load_rl_rows,
)
from megatron_vr1.data.sft_dataset import (
    SFTRow,
    SequenceTooLong,
    encode_sft,
    encode_sft_rows,
    load_sft_data,
    load_sft_rows,
    pack_examples,
    pack_lengths,
)
from megatron_vr1.data.synthetic import PROBLEM, cot_response, layout_key, make_problem, write_synthetic
from megatron_vr1.rewards import hard_format_result_reward

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor(tiny_hf):
    from megatron_vr1.hf_processor import load_processor

    return load_processor(tiny_hf)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synth"), n_train=40, n_val=10, n_test=10, n_sft=20, seed=0)


def _png(color="red", size=(112, 112)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, columns: dict, image_col="images") -> Path:
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    image_type = pa.list_(cell) if image_col == "images" else cell
    fields = [(image_col, image_type)] + [(k, pa.string()) for k in columns if k != image_col]
    pq.write_table(pa.table(columns, schema=pa.schema(fields)), path)
    return path


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_splits_are_disjoint(tmp_path, synth):
    again = write_synthetic(tmp_path / "again", n_train=40, n_val=10, n_test=10, n_sft=20, seed=0)
    for name in ("train", "val", "test"):
        assert pq.read_table(getattr(synth, name)).equals(pq.read_table(getattr(again, name)))
    assert synth.sft.read_text() == again.sft.read_text()
    assert sorted(p.name for p in synth.image_dir.iterdir()) == sorted(p.name for p in again.image_dir.iterdir())
    assert all((synth.image_dir / p.name).read_bytes() == p.read_bytes() for p in again.image_dir.iterdir())
    assert not list(synth.train.parent.glob(".*tmp*"))  # temp files were renamed away

    other = synthetic.draw_splits(40, 10, 10, 20, seed=1)
    splits = synthetic.draw_splits(40, 10, 10, 20, seed=0)
    assert [p.answer for p in other["train"]] != [p.answer for p in splits["train"]]
    keys = {name: [layout_key(p.shapes) for p in problems] for name, problems in splits.items()}
    assert {name: len(set(k)) for name, k in keys.items()} == {"train": 40, "val": 10, "test": 10, "sft": 20}
    assert len(set().union(*map(set, keys.values()))) == 80  # no layout in two splits
    # The test split does not depend on how much training data is drawn.
    bigger = synthetic.draw_splits(80, 10, 10, 20, seed=0)
    assert [layout_key(p.shapes) for p in bigger["test"]] == keys["test"]


def test_synthetic_problems_follow_the_task_spec():
    rng = random.Random(0)
    problems = [make_problem(rng) for _ in range(500)]
    counts = Counter(int(p.answer) for p in problems)
    assert set(counts) == {0, 1, 2, 3, 4}
    assert all(counts[k] >= 50 for k in range(5)), counts  # each >= 10%
    for p in problems[:100]:
        assert p.image.size == (112, 112) and p.image.mode == "RGB" and p.question == "How many red shapes are there?"
        assert 1 <= len(p.shapes) <= 5 and p.answer == str(sum(s.color == "red" for s in p.shapes))
        assert len({(s.row, s.col) for s in p.shapes}) == len(p.shapes)  # one shape per cell
        assert [(s.row, s.col) for s in p.shapes] == sorted((s.row, s.col) for s in p.shapes)  # reading order
        for s in p.shapes:
            assert 12 <= s.size <= 20 and s.kind in ("circle", "square")
            assert s.col * 28 <= s.x and s.x + s.size <= (s.col + 1) * 28
            assert s.row * 28 <= s.y and s.y + s.size <= (s.row + 1) * 28
            assert p.image.getpixel((s.x + s.size // 2, s.y + s.size // 2)) == synthetic.COLORS[s.color]
    shapes = [synthetic.Shape("square", "red", 0, 0, 12, 0, 0), synthetic.Shape("circle", "green", 0, 1, 12, 28, 0)]
    assert cot_response(shapes, 1) == "<think>I see a red square, a green circle. Red shapes: 1.</think><answer>1</answer>"


def test_every_sft_cot_scores_reward_one(synth):
    problems = synthetic.draw_splits(40, 10, 10, 20, seed=0)["sft"]
    rows = [json.loads(line) for line in synth.sft.read_text().splitlines()]
    assert len(rows) == 20
    for row, problem in zip(rows, problems):
        assert row["conversations"][0] == {"from": "human", "value": "<image>\nHow many red shapes are there?"}
        cot = row["conversations"][1]["value"]
        assert cot == cot_response(problem.shapes, problem.answer)
        assert hard_format_result_reward(cot, problem.answer).reward == 1.0
        assert hard_format_result_reward(cot, str(int(problem.answer) + 1)).reward == 0.0
        assert (synth.sft.parent / row["image"]).is_file()


# ------------------------------------------------------------------------------------ RL rows


def test_rl_parquet_round_trips_through_datasets_and_the_loader(tmp_path, synth):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(synth.train), split="train", cache_dir=str(tmp_path))
    rows = load_rl_rows(synth.train)
    assert len(ds) == len(rows) == 40
    for i in (0, 17, 39):
        hf = ds[i]
        assert isinstance(hf["images"][0], Image.Image) and hf["images"][0].size == (112, 112)
        assert hf["problem"] == PROBLEM and hf["problem"].count("<image>") == 1
        row = rows[i]
        assert isinstance(row, RLRow) and row.index == i and row.problem == hf["problem"]
        assert isinstance(row.answer, str) and row.answer == hf["answer"] and row.answer in "01234"
        assert row.images[0].tobytes() == hf["images"][0].convert("RGB").tobytes()


def test_bad_rl_rows_are_counted_logged_once_and_skipped(tmp_path, caplog):
    good, bad = {"bytes": _png(), "path": None}, {"bytes": b"not a png", "path": None}
    table = {
        "images": [[good], [bad], [good], [good], [good], [], None, [good, good], [good]],
        "problem": ["<image>q", "<image>q", "<image>q", "<image>q", "q", "<image>q", "<image>q", "<image>a<image>b", None],
        "answer": ["1", "1", None, "  ", "1", "1", "1", "2", "1"],
    }
    path = _write_parquet(tmp_path / "mixed.parquet", table)
    with caplog.at_level(logging.INFO, logger="megatron_vr1.data.rl_dataset"):
        data = load_rl_data(path)
    assert [r.index for r in data.rows] == [0, 7]
    assert data.rows[1].answer == "2" and len(data.rows[1].images) == 2
    assert dict(data.report.skipped) == {
        "undecodable_image": 1, "missing_answer": 2, "placeholder_mismatch": 1, "no_images": 2, "missing_problem": 1,
    }
    records = [r for r in caplog.records if r.name == "megatron_vr1.data.rl_dataset"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "2 rows kept, 7 skipped" in records[0].getMessage() and "mixed.parquet" in records[0].getMessage()


def test_all_bad_rl_rows_raise_naming_the_file_and_reason(tmp_path):
    path = _write_parquet(tmp_path / "allbad.parquet", {
        "images": [[{"bytes": b"junk", "path": None}]] * 3 + [[]],
        "problem": ["<image>q"] * 4,
        "answer": ["1"] * 4,
    })
    with pytest.raises(ValueError, match=r"allbad\.parquet.*undecodable_image"):
        load_rl_rows(path)
    with pytest.raises(ValueError, match=r"no problem column.*'problem' or 'question'"):
        load_rl_rows(_write_parquet(tmp_path / "nocol.parquet", {"images": [[]], "answer": ["1"]}))
    with pytest.raises(FileNotFoundError, match="data.train_path"):
        load_rl_rows(tmp_path / "missing.parquet")


def test_rl_column_aliases_image_and_question(tmp_path):
    (tmp_path / "pic.png").write_bytes(_png("blue"))
    path = _write_parquet(tmp_path / "alias.parquet", {
        "image": [{"bytes": _png("green"), "path": None}, {"bytes": None, "path": "pic.png"}],
        "question": ["<image>How many?", "Which <image>?"],
        "answer": ["3", "B"],
    }, image_col="image")
    rows = load_rl_rows(path)
    assert [r.answer for r in rows] == ["3", "B"] and rows[1].problem == "Which <image>?"
    assert rows[0].images[0].getpixel((0, 0)) == (0, 128, 0) and rows[1].images[0].getpixel((0, 0)) == (0, 0, 255)


def test_build_prompt_places_images_and_the_processor_expands_them(processor):
    img = Image.new("RGB", (112, 112), "white")
    row = RLRow(images=[img, img], problem="Compare <image> and <image>.", answer="A", index=0)
    prompt = build_prompt(row, processor)
    assert prompt.text.count(VISION_BLOCK) == 2 and prompt.images == [img, img]
    assert f"user\nCompare {VISION_BLOCK} and {VISION_BLOCK}.<|im_end|>\n" in prompt.text
    assert prompt.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")  # template default
    assert prompt.text.endswith("<|im_start|>assistant\n")
    ids = processor(text=[prompt.text], images=prompt.images, return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 2 * 16

    zero = build_prompt(row, processor, system_prompt=R1_ZERO_SYSTEM_PROMPT)
    assert zero.text.startswith(f"<|im_start|>system\n{R1_ZERO_SYSTEM_PROMPT}<|im_end|>")
    assert "helpful assistant" not in zero.text
    with pytest.raises(ValueError, match="placeholders"):
        build_prompt(RLRow([img], "no placeholder", "1", 3), processor)


def test_prompt_sampler_resumes_exactly():
    rows = list(range(10))
    sampler = PromptSampler(rows, prompts_per_step=4, seed=3)
    first = [sampler.next_batch() for _ in range(3)]  # 12 rows: crosses into epoch 1
    assert sorted(sum(first, [])[:10]) == rows  # an epoch is a permutation
    assert all(len(b) == 4 for b in first)
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state == {"epoch": 1, "position": 2, "seed": 3, "num_rows": 10}
    resumed = PromptSampler(rows, prompts_per_step=4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == [next(sampler) for _ in range(6)]
    assert PromptSampler(rows, 4, seed=4).next_batch() != PromptSampler(rows, 4, seed=3).next_batch()
    with pytest.raises(ValueError, match="same data file"):
        PromptSampler(rows[:9], 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="lower rollout.prompts_per_step"):
        PromptSampler(rows, 11, seed=3)


# ------------------------------------------------------------------------------------ SFT rows


def test_sft_loss_mask_covers_exactly_the_assistant_answer(processor, synth):
    rows = load_sft_rows(synth.sft)
    assert len(rows) == 20
    tok = processor.tokenizer
    for row in rows[:3]:
        ex = encode_sft(row, processor, max_length=512)
        assert len(ex.loss_mask) == len(ex.input_ids)
        masked = [i for i, m in enumerate(ex.loss_mask) if m]
        assert masked == list(range(masked[0], masked[-1] + 1))  # one contiguous span
        assert tok.decode([ex.input_ids[i] for i in masked]) == row.messages[1]["content"] + "<|im_end|>"
        assert tok.decode(ex.input_ids[masked[-1] + 1 :]) == "\n"
        assert ex.pixel_values.shape[0] == 64 and ex.image_grid_thw.tolist() == [[1, 8, 8]]
        # The prompt part is exactly the RL prompt of the same problem (cold start and RL agree).
        rl = build_prompt(RLRow([Image.open(row.images[0]).convert("RGB")], PROBLEM, "0", 0), processor)
        rl_ids = processor(text=[rl.text], images=rl.images)["input_ids"][0]
        assert list(rl_ids) == ex.input_ids[: masked[0]]


def test_sft_loss_mask_multi_turn_with_system(processor, tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    row = SFTRow(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nHow many red shapes are there?"},
            {"role": "assistant", "content": "<think>one</think><answer>1</answer>"},
            {"role": "user", "content": "And blue?"},
            {"role": "assistant", "content": "<answer>0</answer>"},
        ],
        images=[tmp_path / "a.png"],
    )
    ex = encode_sft(row, processor, max_length=512)
    tok = processor.tokenizer
    spans, cur = [], []
    for tid, m in zip(ex.input_ids, ex.loss_mask):
        if m:
            cur.append(tid)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    assert spans == ["<think>one</think><answer>1</answer><|im_end|>", "<answer>0</answer><|im_end|>"]
    assert "Be brief." in tok.decode(ex.input_ids) and "helpful assistant" not in tok.decode(ex.input_ids)


def test_long_sft_rows_are_dropped_not_truncated(processor, synth):
    rows = load_sft_rows(synth.sft)
    n = encode_sft(rows[0], processor, max_length=10_000).num_tokens
    with pytest.raises(SequenceTooLong, match=f"{n} tokens > max_length {n - 1}"):
        encode_sft(rows[0], processor, max_length=n - 1)
    lengths = [encode_sft(r, processor, 10_000).num_tokens for r in rows]
    cutoff = sorted(lengths)[len(lengths) // 2]
    result = encode_sft_rows(rows, processor, max_length=cutoff)
    assert all(e.num_tokens <= cutoff for e in result.rows)
    assert result.report.skipped["too_long"] == sum(n > cutoff for n in lengths) >= 1
    with pytest.raises(ValueError, match="too_long"):
        encode_sft_rows(rows, processor, max_length=5)


def test_the_three_sft_formats_load_to_the_same_row(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(_png())
    q, a = "<image>\nHow many red shapes are there?", "<think>I see a red square. Red shapes: 1.</think><answer>1</answer>"
    records = {
        "llava.jsonl": {"id": "r0", "image": "imgs/x.png",
                        "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "mulberry.jsonl": {"images": ["imgs/x.png"],
                           "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]},
        "ovt.jsonl": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                      "images": [str(tmp_path / "imgs" / "x.png")]},  # absolute paths work too
    }
    loaded = []
    for name, record in records.items():
        (tmp_path / name).write_text(json.dumps(record) + "\n")
        loaded += load_sft_rows(tmp_path / name)
    (tmp_path / "array.json").write_text(json.dumps(list(records.values())))
    loaded += load_sft_rows(tmp_path / "array.json")
    expected = SFTRow(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                      images=[tmp_path / "imgs" / "x.png"])
    assert loaded == [expected] * 6
    assert loaded[0].id == "r0" and [r.index for r in loaded[3:]] == [0, 1, 2]
    # image_root moves the base of relative paths.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.jsonl").write_text(json.dumps(records["llava.jsonl"]) + "\n")
    assert load_sft_rows(tmp_path / "sub" / "rows.jsonl", image_root=tmp_path) == [expected]


def test_bad_sft_rows_are_counted_and_skipped(tmp_path, caplog):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"garbage")
    conv = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "<answer>1</answer>"}]
    lines = [
        json.dumps({"image": "ok.png", "conversations": conv}),
        "{not json",
        json.dumps({"image": "ok.png", "dialogue": conv}),
        json.dumps({"image": "gone.png", "conversations": conv}),
        json.dumps({"image": "broken.png", "conversations": conv}),
        json.dumps({"images": ["ok.png", "ok.png"], "conversations": conv}),
        json.dumps({"image": "ok.png", "conversations": [conv[0], {"from": "robot", "value": "x"}]}),
        json.dumps({"image": "ok.png", "conversations": [conv[0]]}),
        json.dumps({"image": "ok.png", "conversations": [conv[0], {"from": "gpt", "value": " "}]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "ok"}]}),
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="megatron_vr1.data.sft_dataset"):
        data = load_sft_data(tmp_path / "rows.jsonl")
    assert [r.index for r in data.rows] == [0, 9] and data.rows[1].images == []
    assert dict(data.report.skipped) == {
        "invalid_json": 1, "unknown_format": 1, "missing_image": 1, "undecodable_image": 1,
        "placeholder_mismatch": 1, "bad_conversation": 2, "empty_response": 1,
    }
    assert len([r for r in caplog.records if r.name == "megatron_vr1.data.sft_dataset"]) == 1
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[3:5]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*(missing_image|undecodable_image)"):
        load_sft_rows(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------------ packing


def _naive_ffd(lengths, cap):
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, r in enumerate(room):
            if r >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(cap - lengths[i])
    return [sorted(b) for b in bins]


def test_packing_is_first_fit_decreasing_within_max_tokens():
    assert pack_lengths([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 300))]
        bins = pack_lengths(lengths, 128)
        assert bins == _naive_ffd(lengths, 128)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 128 for b in bins)

    from megatron_vr1.data.sft_dataset import SFTExample

    examples = [SFTExample([7] * n, [1] * n, None, None, index=i) for i, n in enumerate([30, 50, 20, 64, 10])]
    packed = pack_examples(examples, 64)
    assert sorted(e.index for b in packed for e in b) == [0, 1, 2, 3, 4]
    assert all(sum(e.num_tokens for e in b) <= 64 for b in packed) and packed == pack_examples(examples, 64)
    with pytest.raises(ValueError, match="example 3 has 64 tokens"):
        pack_examples(examples, 63)
