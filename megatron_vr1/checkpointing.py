"""Trainer checkpoints: megatron-core distributed checkpoints of model, optimizer, per-rank RNG
states and the loop's position, written atomically.

Layout (a checkpoint folder is also a valid `megatron-vr1 convert mcore-to-hf --mcore` input):
    RUN/checkpoints/<tag>/model/            torch_dist: model + optimizer tensors, RNG objects, state
    RUN/checkpoints/<tag>/hf/               config, tokenizer, processor (for export / the engine)
    RUN/checkpoints/<tag>/megatron_vr1.json what it is
    RUN/checkpoints/latest                  the tag of the newest complete checkpoint
Writes go to `.<tag>.tmp` and are renamed when complete (`megatron_vr1.json` is the last file
written, after megatron-core's `model/metadata.json`); `latest` moves last (write then rename), so a
kill at any moment leaves the previous checkpoint intact and `latest` pointing to it.

Tags: RL writes `stage{K}_step{NNNNN}` every checkpoint.save_interval steps, `stage{K}_end` at the
end of each PTST stage and `best` (never named by `latest`); SFT writes `sft_step_{NNNNNN}` and
`sft_final` (model only). `prune_checkpoints` deletes only the periodic `*_step*` ones.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from checkpoints_conv.convert import FORMAT, HF_DIR, INFO, MODEL_DIR, copy_non_weights

log = logging.getLogger(__name__)

LATEST = "latest"
PERIODIC = re.compile(r"^(?:stage(?P<stage>\d+)_step(?P<step>\d+)|sft_step_(?P<sft_step>\d+))$")
"""Names of the periodic step checkpoints that `prune_checkpoints` may delete (RL and SFT)."""
_DELETING = ".deleting-"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def _unwrap(model):
    return getattr(model, "module", model)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _sharded_state(model, optimizer, state: dict, loading: bool = False, with_rng: bool = True):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = _unwrap(model).sharded_state_dict()  # keys without DDP's "module." prefix
    sd = {"model": model_sd, "state": dict(state, world_size=_world())}
    if with_rng:
        sd["rng"] = ShardedObject("rng_state", _rng_state(), (_world(),), (_rank(),), replica_id=0)
    if optimizer is not None:
        # is_loading: a fresh optimizer has no Adam state yet; without it the moments would
        # silently restart on resume
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading)
    return sd


def save_checkpoint(run_dir: Path, tag: str, model, optimizer, state: dict, hf_dir: Path,
                    update_latest: bool = True) -> Path:
    """Save on all ranks together; returns the final folder."""
    from megatron.core import dist_checkpointing

    root = Path(run_dir) / "checkpoints"
    final = root / tag
    tmp = root / f".{tag}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / MODEL_DIR).mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, state), str(tmp / MODEL_DIR))
    _barrier()
    if _rank() == 0:
        copy_non_weights(Path(hf_dir), tmp / HF_DIR)
        # written last: its presence (with the format) marks a finished save, see is_complete
        (tmp / INFO).write_text(json.dumps({"format": FORMAT, "kind": "trainer", "tag": tag, "key_scheme": "hub",
                                            "saved_at": time.time()}, indent=2) + "\n")
        if final.exists():
            old = root / f".{tag}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        if update_latest:
            lt = root / f".{LATEST}.tmp"
            lt.write_text(tag + "\n")
            os.replace(lt, root / LATEST)
    _barrier()
    return final


def _info(ckpt_dir: Path) -> Optional[dict]:
    try:
        info = json.loads((ckpt_dir / INFO).read_bytes())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_complete(ckpt_dir: str | os.PathLike) -> bool:
    """Whether `ckpt_dir` holds a finished checkpoint: megatron-core's `model/metadata.json` (written
    at the end of its save) and torch's `model/.metadata`, then our `megatron_vr1.json` (written after
    them, with the format). Pure file inspection, safe before anything is built; a temporary or
    half-deleted folder (a name starting with '.') is never complete."""
    d = Path(ckpt_dir)
    if d.name.startswith(".") or not d.is_dir():
        return False
    if not ((d / MODEL_DIR / "metadata.json").is_file() and (d / MODEL_DIR / ".metadata").is_file()):
        return False
    info = _info(d)
    return info is not None and info.get("format") == FORMAT


def _saved_at(ckpt_dir: Path) -> float:
    """When a checkpoint was saved: `saved_at` in its megatron_vr1.json, else (older saves) the
    modification time of its model/metadata.json."""
    t = (_info(ckpt_dir) or {}).get("saved_at")
    return float(t) if isinstance(t, (int, float)) else (ckpt_dir / MODEL_DIR / "metadata.json").stat().st_mtime


def _latest_name(root: Path) -> Optional[str]:
    """The tag `latest` names, '' when the file is empty or unreadable, None when there is no file."""
    f = root / LATEST
    if not f.is_file():
        return None
    try:
        return f.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a run resumes from; pure file inspection (call it before building anything).

    - no `checkpoints/latest` file: None (a fresh start; deleting `latest` starts over);
    - `latest` names a complete checkpoint (`is_complete`): that one;
    - `latest` names a missing or incomplete checkpoint (or is empty/damaged): the newest complete
      checkpoint of the run instead, newest by the save time recorded in its megatron_vr1.json
      (older saves: the mtime of model/metadata.json; ties: the later tag name), with a warning
      naming both; None only when the run has no complete checkpoint at all.
    Save time rather than a step number because RL (`stage{K}_step{N}`, `stage{K}_end`, `best`)
    and SFT tags count steps differently; the last complete save is the furthest point of the run
    that survives (`best` included: it holds the loop state of its step like any other save)."""
    root = Path(run_dir) / "checkpoints"
    name = _latest_name(root)
    if name is None:
        return None
    named = root / name if name and "/" not in name and not name.startswith(".") else None
    if named is not None and is_complete(named):
        return named
    what = "incomplete" if named is not None and named.exists() else "missing"
    found = [d for d in root.iterdir() if is_complete(d)]
    if not found:
        log.warning("%s names %r, which is %s, and %s holds no complete checkpoint: starting from scratch",
                    root / LATEST, name, what, root)
        return None
    newest = max(found, key=lambda d: (_saved_at(d), d.name))
    log.warning("%s names %r, which is %s; resuming from %s instead (the newest complete checkpoint)",
                root / LATEST, name, what, newest)
    return newest


def _periodic_order(name: str) -> Optional[tuple[int, int]]:
    """(stage, step) of a periodic checkpoint name (SFT counts as stage -1: it precedes RL), else None."""
    m = PERIODIC.match(name)
    if m is None:
        return None
    if m.group("sft_step") is not None:
        return (-1, int(m.group("sft_step")))
    return (int(m.group("stage")), int(m.group("step")))


def _remove(path: Path) -> None:
    """Rename to a hidden name first (so nothing sees a half-deleted checkpoint), then delete."""
    doomed = path.parent / f".{path.name}{_DELETING}{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete the periodic step checkpoints of a run beyond the newest `keep_last`; returns the deleted paths.

    Periodic means a name matching `PERIODIC`: RL `stage{K}_step{N}` and SFT `sft_step_{N}`, ordered
    by (K, N) (SFT before RL). Never deleted: `best`, stage ends (`stage{K}_end`), `sft_final`, any
    other name, and whatever `latest` names. keep_last <= 0 keeps everything. Each deletion
    renames the folder to a hidden `.<tag>.deleting-<pid>` and then removes it, so a kill
    mid-way leaves no partial checkpoint under its tag (left-overs are removed by the next call).
    Call on one rank only, after the save that precedes it has finished."""
    root = Path(run_dir) / "checkpoints"
    if keep_last <= 0 or not root.is_dir():
        return []
    for leftover in root.glob(f".*{_DELETING}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    protected = _latest_name(root)
    periodic = sorted((order, d) for d in root.iterdir()
                      if d.is_dir() and (order := _periodic_order(d.name)) is not None)
    doomed = [d for _, d in periodic[:-keep_last] if d.name != protected]
    for d in doomed:
        _remove(d)
    if doomed:
        log.info("pruned %d old checkpoint(s) (checkpoint.keep_last=%d): %s", len(doomed), keep_last,
                 ", ".join(d.name for d in doomed))
    return doomed


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG states; returns the loop state."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(Path(path) / MODEL_DIR))
    state = dict(common.get("state", {}))
    same_world = state.pop("world_size", None) == _world()
    if not same_world:
        log.warning("%s was saved with another world size: RNG states are not restored", path)
    sd = _sharded_state(model, optimizer, {}, loading=True, with_rng=same_world)
    sd = {k: v for k, v in sd.items() if k != "state"}
    loaded = dist_checkpointing.load(sd, str(Path(path) / MODEL_DIR))
    missing, unexpected = _unwrap(model).load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if same_world:
        _set_rng_state(loaded["rng"])
    return state
