"""Bad input fails early, naming the file and the fix: damaged safetensors / config.json / index,
`--mcore` folders that are not checkpoints; and resume state: `is_complete`, `latest_checkpoint`'s
fallback and `prune_checkpoints` (fake checkpoint folders, no model is built)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints_conv.arch import load_hf_arch
from checkpoints_conv.convert import FORMAT, INFO, mcore_to_hf
from checkpoints_conv.hf_io import HFReader, read_header, write_safetensors
from megatron_vr1.checkpointing import is_complete, latest_checkpoint, prune_checkpoints
from megatron_vr1.cli import main as cli

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = {
    "model_type": "qwen2_5_vl",
    "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "intermediate_size": 128, "vocab_size": 200, "rope_scaling": {"mrope_section": [4, 6, 6]}},
    "vision_config": {"depth": 1, "hidden_size": 32, "num_heads": 1, "intermediate_size": 60, "out_hidden_size": 64},
}  # fmt: skip


# ---- safetensors ---------------------------------------------------------------------------


def _safetensors(path: Path) -> Path:
    entries = [("a", torch.float32, (4, 3)), ("b", torch.bfloat16, (5,))]
    tensors = {"a": torch.arange(12, dtype=torch.float32).view(4, 3), "b": torch.ones(5, dtype=torch.bfloat16)}
    write_safetensors(path, entries, tensors.__getitem__)
    return path


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_good_safetensors_reads(tmp_path):
    hdr = read_header(_safetensors(tmp_path / "ok.safetensors"))
    assert {k: (v["dtype"], v["shape"]) for k, v in hdr.items()} == {"a": ("F32", [4, 3]), "b": ("BF16", [5])}


@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_truncated_safetensors_named_as_damaged(tmp_path, cut):
    f = _safetensors(tmp_path / "model.safetensors")
    data = f.read_bytes()
    keep = {"data": len(data) - 3, "header": 8 + _header_len(f) // 2, "length": 5}[cut]
    f.write_bytes(data[:keep])
    with pytest.raises(ValueError) as e:
        read_header(f)
    msg = str(e.value)
    assert str(f) in msg and "is damaged" in msg and "re-download" in msg
    if cut != "length":
        assert f"the file has {keep}" in msg


def test_safetensors_header_garbage_and_bad_offsets(tmp_path):
    f = _safetensors(tmp_path / "model.safetensors")
    n = _header_len(f)
    data = bytearray(f.read_bytes())
    data[8:8 + n] = b"{" + b"x" * (n - 1)  # same length, not JSON
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors is damaged \(its header is not valid JSON"):
        read_header(f)
    # offsets that do not hold the shape (a hand-edited or corrupted header)
    g = _safetensors(tmp_path / "g.safetensors")
    hdr = json.loads(g.read_bytes()[8:8 + n])
    hdr["a"]["data_offsets"] = [0, 40]
    blob = json.dumps(hdr, separators=(",", ":")).encode().ljust(n)
    g.write_bytes(g.read_bytes()[:8] + blob + g.read_bytes()[8 + n:])
    with pytest.raises(ValueError, match=r"g.safetensors is damaged \(tensor a: data_offsets \[0, 40\] do not hold"):
        read_header(g)


def test_damaged_index(tmp_path):
    _safetensors(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-0000')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is damaged.*re-download"):
        HFReader(tmp_path)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_vr1.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_truncated_download(tiny_hf, tmp_path):
    """An interrupted download: the CLI names the file and the fix, and writes nothing."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf)
    f = hf / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    r = _cli(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {f} is damaged (truncated: its tensors need ") and "re-download it" in last, last
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ---- config.json ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"model_type": "qwen2_5_vl", "text_config": {"hidden', "[1, 2]", "\xff\xfe"])
def test_damaged_config_json(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"config.json is damaged .*re-download it"):
        load_hf_arch(tmp_path)


def test_damaged_config_json_through_convert(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(TINY_CONFIG)[:-30])
    _safetensors(hf / "model.safetensors")
    assert cli(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {hf / 'config.json'} is damaged (not valid JSON: " in err and "re-download" in err
    (hf / "config.json").unlink()
    assert cli(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out")]) == 2
    assert f"--hf {hf} has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- --mcore that is not a checkpoint ------------------------------------------------------


def _hf_config_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.mark.parametrize("case", ["hf_folder", "empty", "missing", "runs_parent", "unfinished"])
def test_mcore_not_a_checkpoint(tmp_path, capsys, case):
    hf = _hf_config_dir(tmp_path / "hfcfg")
    mcore = tmp_path / "m"
    if case == "hf_folder":
        _hf_config_dir(mcore)
        _safetensors(mcore / "model.safetensors")
    elif case == "empty":
        mcore.mkdir()
    elif case == "runs_parent":
        (mcore / "stage0_end" / "model").mkdir(parents=True)
        (mcore / "stage0_end" / "model" / ".metadata").write_bytes(b"x")
    elif case == "unfinished":
        (mcore / "model").mkdir(parents=True)
    hint = {"hf_folder": "already an HF checkpoint", "empty": "pass the folder written by",
            "missing": "does not exist", "runs_parent": "pass one of them", "unfinished": "did not finish"}[case]
    with pytest.raises(FileNotFoundError, match=hint):
        mcore_to_hf(mcore, tmp_path / "out", hf_config=hf, progress=False)
    assert cli(["convert", "mcore-to-hf", "--mcore", str(mcore), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--mcore {mcore} " in err and hint in err
    # verify refuses it before any process group or model is built
    assert cli(["convert", "verify", "--hf", str(hf), "--mcore", str(mcore)]) == 2
    assert hint in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mcore_damaged_metadata_and_info(tmp_path):
    mcore = tmp_path / "m"
    _hf_config_dir(mcore / "hf")
    (mcore / "model").mkdir()
    (mcore / "model" / ".metadata").write_bytes(b"\x80\x04\x95 truncated")
    with pytest.raises(ValueError, match=r"model/.metadata is damaged .*did not finish"):
        mcore_to_hf(mcore, tmp_path / "out", progress=False)
    (mcore / INFO).write_text('{"format": ')
    with pytest.raises(ValueError, match=r"megatron_vr1.json is damaged"):
        mcore_to_hf(mcore, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- resume state ---------------------------------------------------------------------------


def _ckpt(root: Path, tag: str, saved_at: float | None = 0.0, info: bool = True, metadata: bool = True) -> Path:
    d = root / "checkpoints" / tag
    (d / "model").mkdir(parents=True)
    (d / "model" / ".metadata").write_bytes(b"x")
    if metadata:
        (d / "model" / "metadata.json").write_text("{}")
    if info:
        fields = {"format": FORMAT, "kind": "trainer", "tag": tag}
        if saved_at is not None:
            fields["saved_at"] = saved_at
        (d / INFO).write_text(json.dumps(fields))
    return d


def _latest(root: Path, text: str) -> None:
    (root / "checkpoints" / "latest").write_text(text)


def test_is_complete(tmp_path):
    assert is_complete(_ckpt(tmp_path, "stage0_step00010"))
    assert not is_complete(_ckpt(tmp_path, "no_info", info=False))
    assert not is_complete(_ckpt(tmp_path, "no_mcore_metadata", metadata=False))
    assert not is_complete(_ckpt(tmp_path, ".stage0_step00020.tmp"))  # a save in progress
    assert not is_complete(tmp_path / "checkpoints" / "nothing")
    d = _ckpt(tmp_path, "bad_info")
    (d / INFO).write_text('{"format": "megatron-vr1/qw')
    assert not is_complete(d)
    (d / INFO).write_text(json.dumps({"format": "something else"}))
    assert not is_complete(d)


def test_is_complete_on_a_converted_checkpoint(tiny_mcore):
    assert is_complete(tiny_mcore)


def test_latest_checkpoint_normal_cases(tmp_path):
    assert latest_checkpoint(tmp_path) is None  # no checkpoints folder
    a = _ckpt(tmp_path, "stage0_step00010", saved_at=1.0)
    assert latest_checkpoint(tmp_path) is None  # no latest file: a fresh start
    _ckpt(tmp_path, "stage0_step00020", saved_at=2.0)
    _latest(tmp_path, "stage0_step00010\n")
    assert latest_checkpoint(tmp_path) == a  # latest wins over newer ones


@pytest.mark.parametrize("problem", ["missing", "incomplete", "empty"])
def test_latest_checkpoint_falls_back_to_newest_complete(tmp_path, caplog, problem):
    _ckpt(tmp_path, "stage0_step00010", saved_at=100.0)
    newest = _ckpt(tmp_path, "stage0_end", saved_at=300.0)  # newest by save time, not by name
    _ckpt(tmp_path, "stage0_step00020", saved_at=200.0)
    _ckpt(tmp_path, "stage1_step00010", saved_at=400.0, info=False)  # a killed save: incomplete
    _latest(tmp_path, {"missing": "stage1_step00020", "incomplete": "stage1_step00010", "empty": ""}[problem])
    with caplog.at_level(logging.WARNING, logger="megatron_vr1.checkpointing"):
        assert latest_checkpoint(tmp_path) == newest
    msg = caplog.text
    assert f"which is {'incomplete' if problem == 'incomplete' else 'missing'}" in msg and str(newest) in msg
    if problem != "empty":
        assert {"missing": "stage1_step00020", "incomplete": "stage1_step00010"}[problem] in msg


def test_latest_checkpoint_fallback_uses_mtime_without_saved_at(tmp_path):
    old = _ckpt(tmp_path, "sft_step_000020", saved_at=None)
    new = _ckpt(tmp_path, "sft_step_000010", saved_at=None)
    os.utime(old / "model" / "metadata.json", (1000, 1000))
    os.utime(new / "model" / "metadata.json", (2000, 2000))
    _latest(tmp_path, "sft_step_000030")
    assert latest_checkpoint(tmp_path) == new


def test_latest_checkpoint_none_complete(tmp_path, caplog):
    _ckpt(tmp_path, "stage0_step00010", info=False)
    _latest(tmp_path, "stage0_step00010")
    with caplog.at_level(logging.WARNING, logger="megatron_vr1.checkpointing"):
        assert latest_checkpoint(tmp_path) is None
    assert "no complete checkpoint" in caplog.text


def test_latest_checkpoint_needs_no_model_code(tmp_path):
    """Pure file inspection: callable before anything is built (megatron-core is not imported)."""
    _ckpt(tmp_path, "stage0_end")
    _latest(tmp_path, "stage0_end")
    code = ("import sys; from megatron_vr1.checkpointing import latest_checkpoint, prune_checkpoints;"
            f"print(latest_checkpoint({str(tmp_path)!r}).name, prune_checkpoints({str(tmp_path)!r}, 1),"
            "'megatron.core' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["stage0_end", "[]", "False"]


def _tags(root: Path) -> set[str]:
    return {p.name for p in (root / "checkpoints").iterdir() if p.is_dir()}


def test_prune_checkpoints_rl(tmp_path):
    steps = [f"stage0_step{n:05d}" for n in (10, 20, 30, 40)] + ["stage1_step00010", "stage1_step00020"]
    for t in [*steps, "stage0_end", "best", "sft_final", "custom"]:
        _ckpt(tmp_path, t)
    _latest(tmp_path, "stage0_step00020")  # e.g. a resumed run: never deleted
    assert prune_checkpoints(tmp_path, 0) == [] and prune_checkpoints(tmp_path, -1) == []
    assert len(_tags(tmp_path)) == 10
    deleted = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["stage0_step00010", "stage0_step00030", "stage0_step00040"]
    assert _tags(tmp_path) == {"stage0_step00020", "stage1_step00010", "stage1_step00020", "stage0_end", "best",
                               "sft_final", "custom"}
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary names left
    assert prune_checkpoints(tmp_path, 2) == []


def test_prune_checkpoints_sft(tmp_path):
    for n in (5, 10, 15, 100):
        _ckpt(tmp_path, f"sft_step_{n:06d}")
    _ckpt(tmp_path, "sft_final")
    _latest(tmp_path, "sft_final")
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["sft_step_000005", "sft_step_000010",
                                                                "sft_step_000015"]
    assert _tags(tmp_path) == {"sft_step_000100", "sft_final"}


def test_prune_is_safe_when_killed_mid_delete(tmp_path, monkeypatch):
    """The checkpoint leaves its name before any file goes: a crash mid-delete never leaves a
    half-deleted folder that looks like a checkpoint; the next prune removes the left-over."""
    for n in (1, 2, 3):
        _ckpt(tmp_path, f"stage0_step{n:05d}")
    _latest(tmp_path, "stage0_step00003")
    import megatron_vr1.checkpointing as ck

    def boom(path, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", boom)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, 1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert not (root / "stage0_step00001").exists() and len(list(root.glob(".stage0_step00001.deleting-*"))) == 1
    assert latest_checkpoint(tmp_path) == root / "stage0_step00003"
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["stage0_step00002"]
    assert _tags(tmp_path) == {"stage0_step00003"} and not list(root.glob(".*"))
