"""Weight resync: the trainer's Megatron shards (any TP/PP) -> HF-named tensors, in bounded buckets.

Uses the one map in `checkpoints_conv.mapping`: for each layer group (one LM layer, one vision
block, or one global tensor), every rank
  1. takes its local pieces from the model's own `sharded_state_dict()` (so TP splits, the fused
     SwiGLU halves and stacked layer offsets come from megatron-core itself, not restated here),
  2. assembles the full Megatron tensor inside its tensor-parallel group (all-gather),
  3. with pipeline parallelism, receives it from the stage that owns it (broadcast from that
     stage's first rank; without PP every rank already holds it after step 2),
  4. unpacks it into HF tensors with `mapping.unpack`.
Buckets hold whole layer groups (an engine must receive whole modules per load call) and are
yielded before they would exceed `bucket_bytes` (a single group larger than that is sent alone);
peak extra memory is one bucket plus one layer group. Groups that did not change (a frozen vision tower) can be skipped.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from checkpoints_conv.mapping import TensorPlan, expected_hf_shapes, group_of, plan, unpack
from megatron_vr1.rollout.engine import Bucket, UpdateStats



def _local_pieces(model) -> dict[tuple[str, Optional[int]], list[tuple[tuple[int, ...], torch.Tensor]]]:
    """(key, layer) -> [(offset inside the layer tensor, local data)] from megatron-core's sharding."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    pieces = defaultdict(list)
    for v in model.sharded_state_dict().values():
        if isinstance(v, ShardedObject):
            continue
        shards = v.build() if isinstance(v, ShardedTensorFactory) else [v]
        for sh in shards if isinstance(shards, list) else [shards]:
            assert isinstance(sh, ShardedTensor) and sh.flattened_range is None, sh
            if sh.prepend_axis_num:
                layer, offset = sh.global_offset[0], tuple(sh.global_offset[1:])
            else:
                layer, offset = None, tuple(sh.global_offset)
            pieces[(sh.key, layer)].append((offset, sh.data.detach()))
    return pieces


class _Topology:
    """Who owns what: pipeline stage of every rank, gathered once."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.tp_group = ps.get_tensor_model_parallel_group() if self.world > 1 else None
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        me = torch.tensor([ps.get_pipeline_model_parallel_rank()])
        stages = [torch.zeros(1, dtype=me.dtype) for _ in range(self.world)]
        if self.world > 1:
            dist.all_gather(stages, me)
        else:
            stages = [me]
        self.first_rank_of_stage: dict[int, int] = {}
        for rank, s in enumerate(stages):
            self.first_rank_of_stage.setdefault(int(s), rank)


def _tp_offsets(pieces: dict, topo: "_Topology") -> Optional[dict]:
    """Every TP rank's offset of every local piece, gathered in ONE collective (the ranks of a TP
    group hold the same pieces in the same order); None without TP."""
    if topo.tp_size == 1:
        return None
    keys = sorted(pieces, key=str)
    flat = torch.tensor([o for k in keys for off, _ in pieces[k] for o in off], dtype=torch.long)
    out = [torch.empty_like(flat) for _ in range(topo.tp_size)]
    dist.all_gather(out, flat, group=topo.tp_group)
    table, pos = {}, 0
    for k in keys:
        per_piece = []
        for off, _ in pieces[k]:
            per_piece.append([tuple(int(x) for x in out[r][pos:pos + len(off)]) for r in range(topo.tp_size)])
            pos += len(off)
        table[k] = per_piece
    return table


def _assemble(p: TensorPlan, local: list, topo: _Topology, dtype: torch.dtype,
              offsets: Optional[list] = None) -> torch.Tensor:
    """Full tensor of one layer of `p.key` from this TP group's pieces (`offsets`: every TP rank's
    offset of each piece, from `_tp_offsets`)."""
    if len(local) == 1 and tuple(local[0][1].shape) == tuple(p.shape):
        return local[0][1]  # already whole (TP 1, or replicated across TP like the norms): no copy
    full = torch.empty(p.shape, dtype=dtype)
    for i, (offset, data) in enumerate(local):
        gathered = [data]
        offs = [offset]
        if topo.tp_size > 1:
            gathered = [torch.empty_like(data) for _ in range(topo.tp_size)]
            dist.all_gather(gathered, data.contiguous(), group=topo.tp_group)
            offs = offsets[i]
        for off, t in zip(offs, gathered):
            idx = tuple(slice(int(o), int(o) + n) for o, n in zip(off, t.shape))
            full[idx] = t
    return full


def hf_buckets(model, arch, bucket_bytes: int = 256 * 2**20, dtype: Optional[torch.dtype] = None,
               include_vision: bool = True, stats: Optional[UpdateStats] = None) -> Iterator[Bucket]:
    """Yield buckets of (canonical HF name, tensor) covering the whole model, on every rank.

    All ranks must call this together (it runs collectives). `model` is this rank's chunk.
    """
    from megatron.core import parallel_state as ps

    topo = _Topology()
    shapes = expected_hf_shapes(arch)
    pieces = _local_pieces(model)
    tp_offsets = _tp_offsets(pieces, topo)
    pipeline = topo.world > 1 and ps.get_pipeline_model_parallel_world_size() > 1
    plans = list(plan(arch, shapes))
    groups: dict[tuple, list[TensorPlan]] = {}
    for p in plans:
        groups.setdefault(group_of(p), []).append(p)
    stage_of = _stage_of_key(arch)
    pdtype = next(model.parameters()).dtype
    stats = stats if stats is not None else UpdateStats()
    bucket: Bucket = []
    size = 0
    for g, gplans in groups.items():
        if not include_vision and gplans[0].key.startswith("vision_model."):
            continue
        full = {}
        for p in gplans:
            local = pieces.get((p.key, p.layer), [])
            offs = tp_offsets.get((p.key, p.layer)) if tp_offsets is not None else None
            t = _assemble(p, local, topo, pdtype, offs) if local else torch.empty(p.shape, dtype=pdtype)
            if pipeline:  # the stage that owns it sends it; without PP every rank has it already
                if local and t is local[0][1]:
                    t = t.clone()  # never overwrite a parameter with the broadcast
                dist.broadcast(t, src=topo.first_rank_of_stage[stage_of(p)])
            full[p.key] = t
        tensors = unpack(gplans, full, shapes)
        del full  # free this group's gather buffers before the next group
        if dtype is not None:
            tensors = {n: t.to(dtype) for n, t in tensors.items()}
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        # buckets end at group boundaries: an engine must receive whole modules per call
        if bucket and size + n > bucket_bytes:
            stats.buckets += 1
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
            yield bucket
            bucket, size = [], 0
        bucket += list(tensors.items())
        size += n
        stats.tensors += len(tensors)
        stats.bytes += n
    if bucket:
        stats.buckets += 1
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
        yield bucket


def _stage_of_key(arch):
    """Pipeline stage that owns a (key, layer): vision and embedding on the first, final norm and
    output layer on the last, LM layers split evenly (as megatron-core builds them)."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    per_stage = arch.text.num_layers // pp

    def stage_of(p: TensorPlan) -> int:
        if p.key.startswith("vision_model.") or p.key.startswith("language_model.embedding."):
            return 0
        if p.key.startswith("language_model.decoder.layers."):
            return p.layer // per_stage
        return pp - 1

    return stage_of
