"""HF safetensors checkpoints: zero-copy reading (mmap) and streaming writing.

Reading maps each shard file once and hands out tensors that are views of the mapping, so a
conversion touches each byte once and holds no second copy of the model. Writing lays out the
safetensors header first (all names, dtypes and shapes are known up front) and then streams one
tensor at a time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from checkpoints_conv.mapping import canonical_hf_name

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


_MAX_HEADER = 100_000_000
_FIX = "re-download it (or re-export it) and run again"


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is damaged ({what}); {_FIX}")


def read_header(path: Path) -> dict:
    """The tensor entries of one safetensors file (name -> dtype, shape, data_offsets, data_start).

    Checked against the file's size before anything is read, so a truncated or otherwise damaged
    file (an interrupted download, a copy that ran out of disk) fails here, naming the file, and
    not later as a JSON error or a short mmap read in the middle of a conversion."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{size} bytes, shorter than the 8-byte safetensors header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header length {n}); {_FIX}")
        if 8 + n > size:
            raise _damaged(path, f"truncated: its header needs {8 + n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        hdr = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"its header is not valid JSON: {e}") from None
    if not isinstance(hdr, dict):
        raise _damaged(path, "its header is not a JSON object")
    hdr.pop("__metadata__", None)
    end = 0
    for name, info in hdr.items():
        try:
            dtype = info["dtype"]
            shape = [int(x) for x in info["shape"]]
            start, stop = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise _damaged(path, f"header entry {name!r} lacks a valid dtype, shape or data_offsets") from None
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype!r}, which the converter does not read "
                             f"(it reads {', '.join(_DTYPES)})")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if min(shape, default=0) < 0 or start < 0 or stop - start != nbytes:
            raise _damaged(path, f"tensor {name}: data_offsets {[start, stop]} do not hold a {dtype} {shape}")
        info["data_start"] = 8 + n + start
        end = max(end, stop)
    if 8 + n + end > size:
        raise _damaged(path, f"truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return hdr


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint; raises naming what is missing."""
    index = folder / INDEX
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise _damaged(index, f"not a JSON object with a weight_map: {type(e).__name__}: {e}") from None
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: {INDEX} lists {len(files)} shard(s) but {missing} are missing; "
                f"copy the complete checkpoint (all shards) into this folder"
            )
        return [folder / f for f in files]
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(folder.glob("*.bin"))
    hint = " (it has .bin files: load and re-save it with save_pretrained(safe_serialization=True))" if bins else ""
    raise FileNotFoundError(f"{folder} has no model.safetensors or {INDEX}{hint}")


class HFReader:
    """Canonical-name access to the tensors of an HF checkpoint folder, as mmap views."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._entries: dict[str, tuple[Path, dict]] = {}
        self.raw_names: dict[str, str] = {}
        for file in weight_files(self.folder):
            for name, info in read_header(file).items():
                canon = canonical_hf_name(name)
                if canon in self._entries:
                    raise ValueError(f"{self.folder}: tensor {canon} appears twice ({name}); the checkpoint mixes key schemes")
                self._entries[canon] = (file, info)
                self.raw_names[canon] = name
        self._maps: dict[Path, mmap.mmap] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(info["shape"]) for k, (_, info) in self._entries.items()}

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entries[name][1]["dtype"]]

    def nbytes(self) -> int:
        return sum(i["data_offsets"][1] - i["data_offsets"][0] for _, i in self._entries.values())

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return mm

    def tensor(self, name: str) -> torch.Tensor:
        """A view of the mapped file (copy-on-write: writes never reach disk)."""
        return self.rows(name, 0, self._entries[name][1]["shape"][0] if self._entries[name][1]["shape"] else 1)

    def rows(self, name: str, start: int, length: int) -> torch.Tensor:
        """Rows [start, start+length) as a view whose storage is exactly those bytes (writers such as
        torch DCP then need no defensive copy)."""
        file, info = self._entries[name]
        shape = list(info["shape"])
        dtype = _DTYPES[info["dtype"]]
        row = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        if not shape:
            return torch.frombuffer(self._map(file), dtype=torch.uint8, count=row,
                                    offset=info["data_start"]).view(dtype).view(())
        flat = torch.frombuffer(self._map(file), dtype=torch.uint8, count=length * row,
                                offset=info["data_start"] + start * row)
        return flat.view(dtype).view([length, *shape[1:]])

    def close(self) -> None:
        self._maps.clear()


def write_safetensors(path: Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Stream tensors into one safetensors file: header from `entries`, then `produce(name)` in order."""
    entries = list(entries)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise AssertionError(f"{name}: produced {t.dtype}{tuple(t.shape)}, header says {dtype}{tuple(shape)}")
            data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            on_bytes(data.nbytes)
            del t, data  # do not hold the previous tensor while the next one is produced
        f.flush()
        os.fsync(f.fileno())
