"""HF <-> Megatron conversion: exact round trips at every layout, atomic writes, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoints_conv.convert import hf_to_mcore, mcore_to_hf
from checkpoints_conv.hf_io import HFReader
from distributed import run_distributed
from megatron_vr1.cli import main as cli


def assert_identical(a_dir, b_dir):
    a, b = HFReader(a_dir), HFReader(b_dir)
    assert sorted(a.raw_names.values()) == sorted(b.raw_names.values()), "key sets differ"
    for name in a.names():
        assert a.dtype(name) == b.dtype(name), name
        assert torch.equal(a.tensor(name), b.tensor(name)), name
    return len(a.names())


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip_bit_identical(tiny_hf, tiny_hf_tied, tmp_path, tp, pp, tied):
    src = tiny_hf_tied if tied else tiny_hf
    hf_to_mcore(src, tmp_path / "mc", tp=tp, pp=pp, progress=False)
    info = json.loads((tmp_path / "mc" / "megatron_vr1.json").read_text())
    assert (info["tp"], info["pp"], info["padded_vocab"], info["padded_vision_ffn"]) == (tp, pp, 512, 192)
    mcore_to_hf(tmp_path / "mc", tmp_path / "hf", progress=False)
    n = assert_identical(src, tmp_path / "hf")
    assert n == (80 if tied else 81)
    # everything but the weights is copied through (config, tokenizer, processor, chat template)
    others = sorted(p.name for p in src.iterdir() if not p.name.endswith(".safetensors"))
    assert others == sorted(p.name for p in (tmp_path / "hf").iterdir() if not p.name.endswith(".safetensors"))


@pytest.mark.slow
def test_roundtrip_through_model_shards(tiny_hf, tiny_mcore, tmp_path):
    """Load into the model at TP2 / PP2 / TP2xPP2, save with megatron-core's own sharded save,
    export: bit-identical to the input."""
    res = run_distributed("reshard_roundtrip", 4, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore),
                          work_dir=str(tmp_path), layouts=[[2, 1], [1, 2], [2, 2]])
    assert res[0] == {"tp2pp1": 81, "tp1pp2": 81, "tp2pp2": 81}


def test_canonical_key_scheme_and_sharded_output(tiny_hf, tiny_mcore, tmp_path):
    mcore_to_hf(tiny_mcore, tmp_path / "canon", key_scheme="canonical", max_shard_bytes=1 << 20, progress=False)
    files = sorted(p.name for p in (tmp_path / "canon").glob("*.safetensors"))
    assert len(files) >= 3 and (tmp_path / "canon" / "model.safetensors.index.json").exists()
    names = HFReader(tmp_path / "canon").raw_names.values()
    assert all(n.startswith(("model.language_model.", "model.visual.", "lm_head.")) for n in names)
    # the canonical-scheme, sharded folder converts back to the same Megatron tensors
    hf_to_mcore(tmp_path / "canon", tmp_path / "mc2", progress=False)
    mcore_to_hf(tmp_path / "mc2", tmp_path / "hub", key_scheme="hub", progress=False)
    assert_identical(tiny_hf, tmp_path / "hub")
    # and transformers loads it
    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "canon")


def test_dtype_cast_on_export(tiny_mcore, tmp_path):
    mcore_to_hf(tiny_mcore, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    r = HFReader(tmp_path / "bf16")
    assert {r.dtype(n) for n in r.names()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "bfloat16" in json.dumps(cfg)


# ---------------------------------------------------------------- bad input, before any write


def test_not_a_qwen_checkpoint(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        hf_to_mcore(tmp_path / "x", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tp_not_dividing_heads(tiny_hf, tmp_path):
    with pytest.raises(ValueError, match=r"tp=3 must divide .* use tp in \[1, 2\]"):
        hf_to_mcore(tiny_hf, tmp_path / "out", tp=3, progress=False)
    with pytest.raises(ValueError, match=r"pp=3 must divide the number of LM layers \(4\)"):
        hf_to_mcore(tiny_hf, tmp_path / "out", pp=3, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_shard(tiny_mcore, tmp_path):
    mcore_to_hf(tiny_mcore, tmp_path / "sharded", max_shard_bytes=1 << 20, progress=False)
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        hf_to_mcore(tmp_path / "sharded", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_weights_not_matching_config(tiny_hf, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing .*layers.4"):
        hf_to_mcore(bad, tmp_path / "out", progress=False)


def test_existing_output_needs_overwrite(tiny_hf, tiny_mcore, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_mcore(tiny_hf, out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    hf_to_mcore(tiny_hf, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model" / ".metadata").exists()


def test_crash_midway_leaves_old_state(tiny_hf, tmp_path, monkeypatch):
    """A failure while writing leaves the previous output untouched and no temporary folder."""
    out = tmp_path / "out"
    hf_to_mcore(tiny_hf, out, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    import checkpoints_conv.hf_io as hf_io

    real = hf_io.HFReader.rows
    calls = {"n": 0}

    def flaky(self, name, start, length):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk full (simulated)")
        return real(self, name, start, length)

    monkeypatch.setattr(hf_io.HFReader, "rows", flaky)
    with pytest.raises(OSError, match="simulated"):
        hf_to_mcore(tiny_hf, out, overwrite=True, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_refuses_nonzero_padding(tiny_hf, tiny_mcore, tmp_path, single_rank):
    """Padding rows must stay zero; a checkpoint where they are not is refused, not truncated."""
    from megatron.core import dist_checkpointing

    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    model = build_model(load_hf_arch(tiny_hf), ModelOptions())
    load_weights(model, tiny_mcore)
    with torch.no_grad():
        model.language_model.embedding.word_embeddings.weight[450] = 1.0
    (tmp_path / "ck").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="padding rows/columns are not zero"):
        mcore_to_hf(tmp_path / "ck", tmp_path / "hf", hf_config=tiny_hf, progress=False)
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- the CLI


def test_cli_convert_and_verify(tiny_hf, tmp_path, capsys):
    assert cli(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(tmp_path / "mc"), "--no-progress"]) == 0
    assert cli(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "hf"),
                "--no-progress"]) == 0
    assert_identical(tiny_hf, tmp_path / "hf")
    capsys.readouterr()
    assert cli(["convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(tmp_path / "mc"), "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tp=3 must divide")


@pytest.mark.slow
def test_cli_verify_prints_diff(tiny_hf, tiny_mcore):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "megatron_vr1.cli", "convert", "verify", "--hf", str(tiny_hf),
                        "--mcore", str(tiny_mcore), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] and max(res["max_abs_diff"].values()) <= 1e-4
