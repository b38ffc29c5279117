"""Functions run on every rank by `distributed.run_distributed` (process group already up)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _init_layout(tp: int, pp: int, seed: int = 0) -> None:
    from megatron.core import parallel_state

    from megatron_vr1 import platform

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    platform.model_parallel_seed(seed)


def logits_parity(hf_dir: str, mcore_dir: str, layouts: list) -> dict:
    """Max |logit diff| vs transformers per probe, for each (tp, pp) layout."""
    from checkpoints_conv.verify import compare

    out = {}
    for tp, pp in layouts:
        _init_layout(tp, pp)
        out[f"tp{tp}pp{pp}"] = compare(hf_dir, mcore_dir, tp=tp, pp=pp)
    return out


def reshard_roundtrip(hf_dir: str, mcore_dir: str, work_dir: str, layouts: list) -> dict:
    """Load the converted checkpoint into the model at each layout, save it with megatron-core's own
    dist_checkpointing.save (sharded by that layout), export that to HF on rank 0 and compare
    every tensor with the original bit for bit. Returns {layout: number of tensors compared}."""
    from megatron.core import dist_checkpointing

    from checkpoints_conv.convert import mcore_to_hf
    from checkpoints_conv.hf_io import HFReader
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    arch = load_hf_arch(hf_dir)
    out = {}
    for tp, pp in layouts:
        _init_layout(tp, pp)
        model = build_model(arch, ModelOptions(tp=tp, pp=pp))
        load_weights(model, mcore_dir)
        saved = Path(work_dir) / f"tp{tp}pp{pp}"
        if dist.get_rank() == 0:
            saved.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(saved))
        dist.barrier()
        if dist.get_rank() == 0:
            exported = Path(work_dir) / f"hf-tp{tp}pp{pp}"
            mcore_to_hf(saved, exported, hf_config=hf_dir, progress=False)
            a, b = HFReader(hf_dir), HFReader(exported)
            assert sorted(a.raw_names.values()) == sorted(b.raw_names.values()), "key sets differ"
            for name in a.names():
                assert a.dtype(name) == b.dtype(name), name
                assert torch.equal(a.tensor(name), b.tensor(name)), f"{name} differs after tp{tp}pp{pp}"
            out[f"tp{tp}pp{pp}"] = len(a.names())
        dist.barrier()
    return out


def resync_tensors(hf_dir: str, mcore_dir: str, layouts: list, bucket_bytes: int) -> dict:
    """The resync's HF tensors at each layout equal the checkpoint's HF tensors bit for bit, on
    every rank, with no bucket above the limit (unless one tensor alone is larger)."""
    from checkpoints_conv.hf_io import HFReader
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.rollout.resync import ResyncStats, hf_buckets

    arch = load_hf_arch(hf_dir)
    ref = HFReader(hf_dir)
    out = {}
    for tp, pp in layouts:
        _init_layout(tp, pp)
        model = build_model(arch, ModelOptions(tp=tp, pp=pp))
        load_weights(model, mcore_dir)
        stats = ResyncStats()
        seen = {}
        for bucket in hf_buckets(model, arch, bucket_bytes=bucket_bytes, stats=stats):
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            assert size <= bucket_bytes or len(bucket) == 1, size
            for name, t in bucket:
                seen[name] = bool(torch.equal(t, ref.tensor(name)))
        assert set(seen) == set(ref.names()), set(ref.names()) ^ set(seen)
        assert all(seen.values()), [k for k, v in seen.items() if not v]
        out[f"tp{tp}pp{pp}"] = {"tensors": stats.tensors, "buckets": stats.buckets}
    return out
