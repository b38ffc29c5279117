"""Megatron-Core distributed checkpoints (torch_dist backend) written and read tensor by tensor.

megatron-core's own `dist_checkpointing.save` needs every tensor in memory before it writes; a
converter must not. This module writes the same on-disk format (torch.distributed.checkpoint
files plus megatron-core's `metadata.json` and `common.pt`) through a planner whose
`resolve_data` produces each chunk only when the writer asks for it, so peak memory is one chunk.
Chunks are the mapping's segments: each is a slice of one HF tensor, at its global offset in the
Megatron tensor (layers stacked on a leading axis). torch DCP reshards on load, so megatron-core
loads the result at any TP/PP with `dist_checkpointing.load`.

Reading works the same way in reverse: a load planner asks only for the region of one layer.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    LoadPlan, LoadPlanner, SavePlan, TensorWriteData, WriteItem, WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}


class Chunk:
    """One chunk to write: `fqn` at `offsets` with `sizes`, produced lazily by `produce()`."""

    __slots__ = ("fqn", "offsets", "sizes", "global_size", "dtype", "produce")

    def __init__(self, fqn: str, offsets: Sequence[int], sizes: Sequence[int], global_size: Sequence[int],
                 dtype: torch.dtype, produce: Callable[[], torch.Tensor]):
        self.fqn, self.dtype, self.produce = fqn, dtype, produce
        self.offsets, self.sizes, self.global_size = torch.Size(offsets), torch.Size(sizes), torch.Size(global_size)


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, chunks: list[Chunk], on_chunk: Callable[[int], None]):
        super().__init__()
        self._chunks = {(c.fqn, tuple(c.offsets)): c for c in chunks}
        self._order = chunks
        self._on_chunk = on_chunk

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=True):
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.fqn, c.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=c.offsets, sizes=c.sizes),
                    properties=TensorProperties(dtype=c.dtype),
                    size=c.global_size,
                ),
            )
            for c in self._order
        ]
        self.plan = SavePlan(items, planner_data={})
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        c = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = c.produce()
        assert t.dtype == c.dtype and t.shape == c.sizes, (c.fqn, t.dtype, t.shape, c.dtype, c.sizes)
        self._on_chunk(t.numel() * t.element_size())
        return t


def save_chunks(out_dir: Path, chunks: list[Chunk], on_chunk: Callable[[int], None] = lambda n: None) -> None:
    """Write a megatron-core torch_dist checkpoint made of `chunks` into `out_dir` (must be new)."""
    out_dir.mkdir(parents=True, exist_ok=False)
    writer = dcp.FileSystemWriter(out_dir, single_file_per_rank=True, thread_count=1, sync_files=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, on_chunk), no_dist=True)
        except dcp.api.CheckpointException as e:
            raise _unwrap(e) from e
    torch.save({}, out_dir / "common.pt")
    (out_dir / "metadata.json").write_text(json.dumps(MCORE_METADATA))


def _unwrap(e: Exception) -> Exception:
    """DCP wraps a rank's exception (e.g. an OSError from a full disk); surface the original."""
    failures = list(getattr(e, "failures", {}).values())
    if len(failures) == 1:
        f = failures[0]
        inner = f[0] if isinstance(f, tuple) else f
        if isinstance(inner, BaseException):
            return inner
    return e


class _RegionLoadPlanner(LoadPlanner):
    """Reads requested regions {fqn: (offsets, destination tensor)} from a checkpoint."""

    def __init__(self, requests: dict[str, tuple[Sequence[int], torch.Tensor]]):
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, dest) in self.requests.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                raise KeyError(f"tensor {fqn} is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(fqn, md, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise AssertionError("no byte objects are read")

    def resolve_tensor(self, read_item):
        dest = self.requests[read_item.dest_index.fqn][1]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, off, length)
        return dest

    def commit_tensor(self, read_item, tensor):
        pass


class DCPReader:
    """Region reads from a torch_dist checkpoint directory without a process group."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.dir = Path(ckpt_dir)
        if not (self.dir / ".metadata").exists():
            raise FileNotFoundError(
                f"{self.dir} is not a megatron-core torch_dist checkpoint (no .metadata file); pass the "
                f"folder written by `megatron-vr1 convert hf-to-mcore` or a trainer checkpoint"
            )
        try:
            self.metadata = dcp.FileSystemReader(self.dir).read_metadata()
        except Exception as e:  # a truncated pickle raises EOFError, UnpicklingError, ValueError...
            raise ValueError(
                f"{self.dir / '.metadata'} is damaged ({type(e).__name__}: {e}); the save or copy that wrote "
                f"this checkpoint did not finish: convert it again or use an earlier checkpoint"
            ) from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(m.size) for k, m in self.metadata.state_dict_metadata.items() if hasattr(m, "size")}

    def dtype(self, fqn: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[fqn].properties.dtype

    def read(self, requests: dict[str, tuple[Sequence[int], torch.Tensor]]) -> None:
        """Fill each destination tensor with the region of `fqn` starting at `offsets`."""
        reader = dcp.FileSystemReader(self.dir)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load({}, storage_reader=reader, planner=_RegionLoadPlanner(requests), no_dist=True)
            except dcp.api.CheckpointException as e:
                raise _unwrap(e) from e
