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
