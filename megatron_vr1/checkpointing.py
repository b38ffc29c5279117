"""Trainer checkpoints: megatron-core distributed checkpoints of model, optimizer, per-rank RNG
states and the loop's position, written atomically.

Layout (a checkpoint folder is also a valid `megatron-vr1 convert mcore-to-hf --mcore` input):
    RUN/checkpoints/<tag>/model/            torch_dist: model + optimizer tensors, RNG objects, state
    RUN/checkpoints/<tag>/hf/               config, tokenizer, processor (for export / the engine)
    RUN/checkpoints/<tag>/megatron_vr1.json what it is
    RUN/checkpoints/latest                  the tag of the newest complete checkpoint
Writes go to `<tag>.tmp-<pid>` and are renamed when complete; `latest` moves last (write then
rename), so a kill at any moment leaves the previous checkpoint intact and `latest` pointing to it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from checkpoints_conv.convert import FORMAT, HF_DIR, INFO, MODEL_DIR, _copy_non_weights

LATEST = "latest"


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
        _copy_non_weights(Path(hf_dir), tmp / HF_DIR)
        (tmp / INFO).write_text(json.dumps({"format": FORMAT, "kind": "trainer", "tag": tag,
                                            "key_scheme": "hub"}, indent=2) + "\n")
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


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    f = Path(run_dir) / "checkpoints" / LATEST
    if not f.exists():
        return None
    path = f.parent / f.read_text().strip()
    if not (path / MODEL_DIR / "metadata.json").exists():
        raise FileNotFoundError(f"{f} names {path.name}, which is incomplete; delete {f} to start over")
    return path


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG states; returns the loop state."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(Path(path) / MODEL_DIR))
    state = dict(common.get("state", {}))
    same_world = state.pop("world_size", None) == _world()
    if not same_world:
        import logging

        logging.getLogger(__name__).warning("%s was saved with another world size: RNG states are not restored", path)
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
