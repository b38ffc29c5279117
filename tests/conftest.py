"""Shared fixtures: the tiny Qwen2.5-VL (untied and tied embeddings) and its Megatron conversion,
built once per test session into a temporary folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    from megatron_vr1.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory) -> Path:
    from megatron_vr1.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_tied") / "hf", seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_mcore(tiny_hf) -> Path:
    from checkpoints_conv.convert import hf_to_mcore

    out = tiny_hf.parent / "mcore"
    hf_to_mcore(tiny_hf, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_mcore_tied(tiny_hf_tied) -> Path:
    from checkpoints_conv.convert import hf_to_mcore

    out = tiny_hf_tied.parent / "mcore"
    hf_to_mcore(tiny_hf_tied, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_hf_tp(tmp_path_factory) -> Path:
    """The tiny model with every size vLLM splits divisible by 2 (vision MLP 172): rollout TP 2."""
    from megatron_vr1.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_tp") / "hf", seed=0, tp_friendly=True)


@pytest.fixture(scope="session")
def tiny_mcore_tp(tiny_hf_tp) -> Path:
    from checkpoints_conv.convert import hf_to_mcore

    out = tiny_hf_tp.parent / "mcore"
    hf_to_mcore(tiny_hf_tp, out, progress=False)
    return out


@pytest.fixture(scope="session")
def single_rank():
    """A one-process gloo group with TP=PP=1 model-parallel state (for in-process model tests)."""
    import os

    from megatron_vr1 import platform

    platform.setup()
    import torch.distributed as dist
    from megatron.core import parallel_state

    from distributed import _free_port

    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    platform.model_parallel_seed(0)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="session")
def tiny_cold_start(tiny_hf, tiny_mcore, tmp_path_factory) -> dict:
    """The tiny model after a short cold-start SFT (one epoch, 63 steps, ~40 s): it writes the
    `<think>..</think><answer>..</answer>` format and earns rewards, unlike the random model.
    Returns {"data": synthetic data folder, "mcore": the sft_final checkpoint}."""
    import os
    import subprocess
    import sys

    from megatron_vr1.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("cold_start")
    data = root / "data"
    write_synthetic(data, n_train=40, n_val=8, n_test=8, n_sft=2000, seed=0)
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "megatron_vr1.cli", "sft", str(repo / "configs/tiny_cpu_sft.yaml"),
           f"run_dir={root / 'sft'}", f"model.hf_path={tiny_hf}", f"model.mcore_path={tiny_mcore}",
           f"sft.data_path={data / 'coldstart_sft.jsonl'}", f"sft.image_root={data}", "sft.epochs=1",
           "checkpoint.save_interval=1000"]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"data": data, "mcore": root / "sft" / "checkpoints" / "sft_final"}
