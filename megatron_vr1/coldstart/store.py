"""Crash-safe files of the generator: append-only shard files of complete lines, atomic writes.

A shard file holds one JSON record per finished row. A chunk's records are appended in ONE
`write` of complete lines followed by `fsync`, so a killed process leaves either the whole
chunk or (on a machine crash) a torn last line; `load` drops a torn or unparsable tail and
truncates the file back to its last complete line before anything is appended again.
Assembled outputs are written to a temporary sibling, fsync'd and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable


class ShardStore:
    def __init__(self, folder: Path, num_shards: int, prefix: str = "shard"):
        self.folder = Path(folder)
        self.num_shards = num_shards
        self.prefix = prefix

    def path(self, shard: int) -> Path:
        return self.folder / f"{self.prefix}-{shard:05d}-of-{self.num_shards:05d}.jsonl"

    def load(self, shard: int) -> dict[int, dict]:
        """Records of a shard by row index; a torn tail is cut off the file."""
        path = self.path(shard)
        if not path.exists():
            return {}
        data = path.read_bytes()
        records, good_end, pos = {}, 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            try:
                rec = json.loads(data[pos:nl])
            except json.JSONDecodeError:
                break
            records[int(rec["index"])] = rec
            good_end = pos = nl + 1
        if good_end < len(data):
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return records

    def append(self, shard: int, records: Iterable[dict]) -> None:
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if not blob:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path(shard), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
