"""HF <-> Megatron conversion of Qwen2.5-VL, streaming tensor by tensor.

A converted Megatron checkpoint is a folder:
    model/              megatron-core torch_dist checkpoint (layout-independent: loads at any TP/PP)
    hf/                 the source's config, tokenizer, processor and chat template (no weights)
    megatron_vr1.json   what was converted: tp/pp recorded as the default layout, dtype, key scheme
Both directions write into a temporary sibling folder and rename it into place at the end, so a
crash leaves either the old state or nothing; an existing output needs `overwrite=True`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from checkpoints_conv.arch import check_parallel_fits, load_hf_arch, padded_sizes
from checkpoints_conv.dcp_io import Chunk, DCPReader, save_chunks
from checkpoints_conv.hf_io import HFReader, write_safetensors
from checkpoints_conv.mapping import TensorPlan, expected_hf_shapes, group_of, plan, unpack

INFO = "megatron_vr1.json"
MODEL_DIR = "model"
HF_DIR = "hf"
FORMAT = "megatron-vr1/qwen2.5-vl/v1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _one_thread(fn):
    """Conversion is memory copies and file writes: a second intra-op thread only competes with
    the kernel's write-out for the cores (measured 2-4x slower on 2 vCPUs; bench/convert.py)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)

    return wrapped


@dataclass
class ConvertStats:
    tensors: int
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)


def _progress(total: int, desc: str, enabled: bool) -> Callable[[int], None]:
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)
    return bar.update


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    """Rename `tmp` into place; an old `out` is moved aside first and removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def copy_non_weights(src: Path, dst: Path) -> None:
    """Copy the files of an HF folder that are not weights (config, tokenizer, processor, chat
    template) into `dst`; used for the `hf/` folder of a converted or trainer checkpoint."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WEIGHT_INDEXES:
            shutil.copy2(f, dst / f.name)


def _key_scheme(reader: HFReader) -> str:
    """'hub' (model.* / visual.*: what transformers saves) or 'canonical' (model.language_model.*)."""
    canonical = any(r.startswith(("model.language_model.", "model.visual.")) for r in reader.raw_names.values())
    return "canonical" if canonical else "hub"


def to_scheme(name: str, scheme: str) -> str:
    """Canonical HF name -> the given key scheme."""
    if scheme == "canonical":
        return name
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def validate_hf(hf_dir: Path):
    """(arch, reader) for an HF Qwen2.5-VL folder, or a clear error before anything is written:
    a missing or damaged config.json, a missing shard, a truncated or damaged safetensors file
    (sizes checked against every header), weights that do not match the config."""
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"--hf {hf_dir} has no config.json; pass the HF Qwen2.5-VL folder holding "
                                "config.json and the safetensors (e.g. a download of Qwen/Qwen2.5-VL-7B-Instruct)")
    arch = load_hf_arch(hf_dir)
    reader = HFReader(hf_dir)
    have, want = reader.shapes(), expected_hf_shapes(arch)
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if arch.text.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints still store a copy: ignored
    if missing or extra:
        raise ValueError(
            f"{hf_dir}: the weights do not match its config.json (Qwen2.5-VL, {arch.text.num_layers} LM layers, "
            f"{arch.vision.depth} vision blocks): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}; check that config.json belongs to these weights"
        )
    bad = [(n, have[n], want[n]) for n in want if have[n] != want[n]]
    if bad:
        n, got, exp = bad[0]
        raise ValueError(f"{hf_dir}: {n} has shape {list(got)} but config.json implies {list(exp)} ({len(bad)} such tensors)")
    return arch, reader


def _chunks_for(tp: TensorPlan, reader: HFReader) -> list[Chunk]:
    dtype = reader.dtype(tp.hf_names[0])
    out = []
    for seg in tp.segments:
        sizes = list(tp.shape)
        sizes[tp.axis] = seg.length
        offsets = [0] * len(tp.shape)
        offsets[tp.axis] = seg.dst
        if tp.layer is not None:
            sizes, offsets = [1, *sizes], [tp.layer, *offsets]

        def produce(seg=seg, sizes=tuple(sizes), axis=tp.axis, layered=tp.layer is not None):
            if seg.hf is None:
                return torch.zeros(sizes, dtype=dtype)
            if axis == 0:
                t = reader.rows(seg.hf, seg.src, seg.length)
            else:
                t = reader.tensor(seg.hf).narrow(axis, seg.src, seg.length)
            if layered:
                t = t.unsqueeze(0)
            return t if t.is_contiguous() else t.contiguous()

        out.append(Chunk(tp.key, offsets, sizes, tp.global_shape, dtype, produce))
    return out


@_one_thread
def hf_to_mcore(hf: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1,
                overwrite: bool = False, progress: bool = True) -> ConvertStats:
    """Convert an HF Qwen2.5-VL folder into a Megatron distributed checkpoint folder."""
    hf, out = Path(hf), Path(out)
    if not hf.is_dir():
        raise FileNotFoundError(f"--hf {hf} is not a folder; pass the folder holding config.json and the safetensors")
    arch, reader = validate_hf(hf)
    check_parallel_fits(arch, tp, pp)
    plans = list(plan(arch, reader.shapes()))
    chunks = [c for p in plans for c in _chunks_for(p, reader)]
    total = sum(torch.Size(c.sizes).numel() * torch.empty((), dtype=c.dtype).element_size() for c in chunks)
    tmp = _prepare_output(out, overwrite)
    t0 = time.perf_counter()
    try:
        save_chunks(tmp / MODEL_DIR, chunks, _progress(total, "hf->mcore", progress))
        copy_non_weights(hf, tmp / HF_DIR)
        pad = padded_sizes(arch)
        info = dict(format=FORMAT, source=str(hf.resolve()), tp=tp, pp=pp, dtype=str(reader.dtype(plans[0].hf_names[0])),
                    key_scheme=_key_scheme(reader), padded_vocab=pad.vocab, padded_vision_ffn=pad.vision_ffn)
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertStats(len(plans), total, time.perf_counter() - t0)


def read_info(mcore: Path) -> dict:
    """The `megatron_vr1.json` of a checkpoint folder ({} when it has none)."""
    f = Path(mcore) / INFO
    if not f.exists():
        return {}
    try:
        info = json.loads(f.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is damaged (not valid JSON: {e}); convert the checkpoint again, or delete the "
                         f"file and pass --key-scheme and --hf-config yourself") from None
    if not isinstance(info, dict):
        raise ValueError(f"{f} is damaged (not a JSON object); convert the checkpoint again")
    return info


def model_dir_of(mcore: str | os.PathLike) -> Path:
    """The torch_dist folder of a checkpoint: `<mcore>/model` for a converted or trainer
    checkpoint, else `mcore` itself (a bare megatron-core checkpoint); or a FileNotFoundError
    that says what `mcore` is instead and which folder to pass."""
    mcore = Path(mcore)
    if not mcore.is_dir():
        raise FileNotFoundError(f"--mcore {mcore} does not exist or is not a folder; pass the folder written by "
                                f"`megatron-vr1 convert hf-to-mcore` or a trainer checkpoint (<run>/checkpoints/<tag>)")
    for d in (mcore / MODEL_DIR, mcore):
        if (d / ".metadata").is_file():
            return d
    if (mcore / "config.json").is_file() and any(mcore.glob("*.safetensors")):
        hint = ("it is already an HF checkpoint (config.json + safetensors), so it needs no export; "
                f"`megatron-vr1 convert hf-to-mcore --hf {mcore} --out <folder>` converts it the other way")
    elif (mcore / MODEL_DIR).is_dir():
        hint = (f"{mcore / MODEL_DIR} has no .metadata: the save or conversion that wrote it did not finish; "
                "convert again, or use an earlier checkpoint")
    elif any(p.is_dir() and (p / MODEL_DIR / ".metadata").is_file() for p in mcore.iterdir()):
        hint = "it holds checkpoints: pass one of them (e.g. <run>/checkpoints/<tag>), not their parent"
    else:
        hint = "pass the folder written by `megatron-vr1 convert hf-to-mcore` or a trainer checkpoint " \
               "(<run>/checkpoints/<tag>)"
    raise FileNotFoundError(f"--mcore {mcore} is not a Megatron checkpoint (no {MODEL_DIR}/.metadata); {hint}")


class MegatronToHF:
    """Produces HF tensors (canonical names) from a Megatron checkpoint, one layer group at a time."""

    def __init__(self, reader: DCPReader, arch, dtype: Optional[torch.dtype] = None):
        self.reader, self.arch = reader, arch
        self.shapes = expected_hf_shapes(arch)
        self.plans = list(plan(arch, self.shapes))
        have = reader.shapes()
        for p in self.plans:
            if p.key not in have:
                raise ValueError(f"{reader.dir}: tensor {p.key} is missing; is this a Qwen2.5-VL checkpoint of this config?")
            if tuple(have[p.key]) != tuple(p.global_shape):
                raise ValueError(f"{reader.dir}: {p.key} has shape {list(have[p.key])}, the config implies "
                                 f"{list(p.global_shape)}; the hf/ config does not belong to this checkpoint")
        self.group_of: dict[str, tuple] = {}
        self.by_group: dict[tuple, list[TensorPlan]] = {}
        for p in self.plans:
            self.by_group.setdefault(group_of(p), []).append(p)
            for n in p.hf_names:
                self.group_of[n] = group_of(p)
        self.out_dtype = dtype
        self._cache: tuple = (None, {})

    def dtype(self, name: str) -> torch.dtype:
        if self.out_dtype is not None:
            return self.out_dtype
        plan_ = next(p for p in self.by_group[self.group_of[name]] if name in p.hf_names)
        return self.reader.dtype(plan_.key)

    def names(self) -> list[str]:
        return list(self.shapes)

    def _load_group(self, g: tuple) -> dict[str, torch.Tensor]:
        plans = self.by_group[g]
        requests = {}
        for p in plans:
            buf = torch.empty(((1,) if p.layer is not None else ()) + p.shape, dtype=self.reader.dtype(p.key))
            requests[p.key] = (([p.layer] + [0] * len(p.shape)) if p.layer is not None else [0] * len(p.shape), buf)
        self.reader.read(requests)
        full = {p.key: (requests[p.key][1][0] if p.layer is not None else requests[p.key][1]) for p in plans}
        return unpack(plans, full, self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        g = self.group_of[name]
        if self._cache[0] != g:
            self._cache = (None, {})  # drop the previous group before loading the next
            self._cache = (g, self._load_group(g))
        t = self._cache[1][name]
        return t if self.out_dtype is None else t.to(self.out_dtype)


@_one_thread
def mcore_to_hf(mcore: str | os.PathLike, out: str | os.PathLike, hf_config: Optional[str | os.PathLike] = None,
                dtype: Optional[torch.dtype] = None, key_scheme: Optional[str] = None,
                max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, progress: bool = True) -> ConvertStats:
    """Export a Megatron checkpoint folder (converted or trained) to an HF folder."""
    mcore, out = Path(mcore), Path(out)
    model_dir = model_dir_of(mcore)
    hf_dir = Path(hf_config) if hf_config else mcore / HF_DIR
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json; pass --hf-config with the HF folder the model came from")
    arch = load_hf_arch(hf_dir)
    info = read_info(mcore)
    src = MegatronToHF(DCPReader(model_dir), arch, dtype)
    scheme = key_scheme or info.get("key_scheme", "hub")
    if scheme not in ("hub", "canonical"):
        raise ValueError(f"key_scheme={scheme!r}; use 'hub' (model.*/visual.*) or 'canonical' (model.language_model.*)")
    names = src.names()
    sizes = {n: torch.Size(src.shapes[n]).numel() * torch.empty((), dtype=src.dtype(n)).element_size() for n in names}
    files, cur, cur_bytes = [], [], 0
    for n in names:
        if cur and cur_bytes + sizes[n] > max_shard_bytes:
            files.append(cur)
            cur, cur_bytes = [], 0
        cur.append(n)
        cur_bytes += sizes[n]
    files.append(cur)
    total = sum(sizes.values())
    tmp = _prepare_output(out, overwrite)
    bar = _progress(total, "mcore->hf", progress)
    t0 = time.perf_counter()
    try:
        fnames = (["model.safetensors"] if len(files) == 1 else
                  [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
        weight_map = {}
        for fname, group in zip(fnames, files):
            entries = [(to_scheme(n, scheme), src.dtype(n), src.shapes[n]) for n in group]
            by_out = {to_scheme(n, scheme): n for n in group}
            write_safetensors(tmp / fname, entries, lambda name: src.tensor(by_out[name]), bar)
            weight_map.update({e[0]: fname for e in entries})
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_non_weights(hf_dir, tmp)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertStats(len(names), total, time.perf_counter() - t0)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    name = str(dtype).replace("torch.", "")
    for k in ("torch_dtype", "dtype"):
        if k in cfg:
            cfg[k] = name
    for sub in ("text_config", "vision_config"):
        for k in ("torch_dtype", "dtype"):
            if isinstance(cfg.get(sub), dict) and k in cfg[sub]:
                cfg[sub][k] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n")
