"""Cold-start data by modality bridging (Vision-R1, docs/method.md), sharded and resumable.

Per (image, question, answer) row:
  1. the MLLM writes a pseudo-CoT from image + question + answer      (coldstart.pseudo_cot_prompt)
  2. the MLLM writes a detailed description given the pseudo-CoT       (coldstart.description_prompt)
  3. the text reasoner writes the CoT from question + description
     (+ the answer when coldstart.give_answer)                         (coldstart.reasoning_prompt)
  4. `filters.judge_cot` keeps it or says why not.

Rows go through the three calls a chunk at a time (`coldstart.chunk_rows`; chunk boundaries are
fixed by row position, so a resumed run batches exactly as an uninterrupted one). Each finished
chunk is appended to its shard file (`store.ShardStore`), kept, filtered and failed rows alike;
a rerun skips every row with a record. When every row of the input has a record, the kept rows
are assembled (sorted by row) into `coldstart_<format>.jsonl` + `images/`, and `summary.json`
counts why rows were dropped. `manifest.json` pins what the shard records depend on (input,
prompts, models, sampling): resuming with different settings is an error, not a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_vr1.coldstart.store import ShardStore, atomic_write_bytes, atomic_write_jsonl, atomic_write_text

log = logging.getLogger("megatron_vr1.coldstart")

IMAGE_PLACEHOLDER = "<image>"
MAX_EXAMPLES = 5


# ----------------------------------------------------------------------------- the algorithm


def run_bridge(cfg, shard: Optional[int] = None) -> Optional[dict]:
    """Generate (or finish) the cold-start set of `cfg.coldstart`; returns the summary once every
    shard is complete (None while other shards are still missing rows)."""
    cs = cfg.coldstart
    rows = load_input(cfg)
    out = output_dir(cfg)
    check_manifest(out, bridge_fingerprint(cfg, len(rows)))
    store = ShardStore(out / "shards", cs.num_shards)
    backends: dict = {}

    def prepare():  # models load only when some row is left to do
        backends.update(load_backends(cfg))

    def process(chunk):
        return bridge_chunk(chunk, backends["mllm"], backends["reasoner"], cfg, out)

    try:
        run_chunks(rows, store, _shards(shard, cs.num_shards), cs.chunk_rows, process, "coldstart", prepare)
    finally:
        for b in {id(b): b for b in backends.values()}.values():
            b.close()
    return assemble(rows, store, out, cs.formats)


def bridge_chunk(rows, mllm, reasoner, cfg, out: Path) -> list[dict]:
    """The three model calls for a chunk of rows, then the filters; one record per row."""
    from megatron_vr1.coldstart.backends import ChatRequest, default_sampling
    from megatron_vr1.coldstart.filters import judge_cot

    cs = cfg.coldstart
    recs = {r.index: new_record(r) for r in rows}
    live = list(rows)

    def step(name, model, make_request, sampling):
        nonlocal live
        results = model.generate([make_request(r) for r in live], n=1, sampling=sampling)
        alive = []
        for r, res in zip(live, results):
            rec = recs[r.index]
            if res.error is not None:
                rec.update(status="failed", reason=f"{name}_error", detail=res.error[:500])
                continue
            c = res.completions[0]
            rec[name] = c.text
            if name != "reasoning" and not c.text.strip():
                rec.update(status="filtered", reason=f"empty_{name}")
                continue
            rec[f"{name}_finish"] = c.finish_reason  # a cut pseudo-CoT/description is still usable
            alive.append(r)
        live = alive

    def fields(r):
        q = question_text(r.problem)
        rec = recs[r.index]
        hint = cs.answer_hint.format(answer=r.answer) if cs.give_answer else ""
        return dict(question=q, answer=r.answer, pseudo_cot=rec.get("pseudo_cot", ""),
                    description=rec.get("description", ""), answer_hint=hint)

    mllm_sampling, reasoner_sampling = default_sampling(cs.mllm), default_sampling(cs.reasoner)
    step("pseudo_cot", mllm, lambda r: ChatRequest(cs.pseudo_cot_prompt.format(**fields(r)), r.images), mllm_sampling)
    step("description", mllm, lambda r: ChatRequest(cs.description_prompt.format(**fields(r)), r.images),
         mllm_sampling)
    step("reasoning", reasoner, lambda r: ChatRequest(cs.reasoning_prompt.format(**fields(r))), reasoner_sampling)
    for r in live:
        rec = recs[r.index]
        v = judge_cot(rec["reasoning"], r.answer, finish_reason=rec["reasoning_finish"],
                      rewrites=cs.rewrite_phrases, forbidden=cs.forbidden_phrases, max_repeats=cs.max_repeats)
        rec.update(status="kept" if v.keep else "filtered", reason=v.reason, response=v.response,
                   predicted=v.predicted)
        if v.keep:
            rec["images"] = save_images(r, out)
    return [recs[r.index] for r in rows]


# ----------------------------------------------------------------------------- shared machinery


def run_chunks(rows, store: ShardStore, shards: list[int], chunk_rows: int,
               process: Callable[[list], list[dict]], what: str, prepare: Callable[[], None]) -> None:
    """Process every row without a record, chunk by chunk (fixed boundaries), shard by shard;
    `prepare()` (loading the models) runs once, before the first chunk that has work."""
    progress = Progress(what, len(rows))
    done = {k: store.load(k) for k in shards}
    for recs in done.values():
        progress.add_done(recs.values())
    prepared = False
    for k in shards:
        mine = rows[k :: store.num_shards]
        for start in range(0, len(mine), chunk_rows):
            chunk = [r for r in mine[start : start + chunk_rows] if r.index not in done[k]]
            if not chunk:
                continue
            if not prepared:
                prepare()
                prepared = True
                progress.t0 = time.monotonic()
            recs = process(chunk)
            assert [r["index"] for r in recs] == [r.index for r in chunk]
            store.append(k, recs)
            progress.update(recs)


@dataclass
class Progress:
    what: str
    total: int
    counts: Counter = field(default_factory=Counter)
    new: int = 0
    t0: float = field(default_factory=time.monotonic)

    def add_done(self, recs) -> None:
        for r in recs:
            self.counts[r["status"]] += 1

    def update(self, recs: list[dict]) -> None:
        self.add_done(recs)
        self.new += len(recs)
        done = sum(self.counts.values())
        rate = self.new / max(time.monotonic() - self.t0, 1e-9)
        log.info("%s: %d/%d rows (%.0f%%), %.2f rows/s, kept %d, filtered %d, failed %d", self.what, done,
                 self.total, 100 * done / max(self.total, 1), rate, self.counts["kept"], self.counts["filtered"],
                 self.counts["failed"])


def new_record(row) -> dict:
    return {"index": row.index, "status": None, "reason": None, "problem": row.problem, "answer": row.answer}


def question_text(problem: str) -> str:
    """The question without its `<image>` placeholders (the images go first in the prompts)."""
    return " ".join(problem.replace(IMAGE_PLACEHOLDER, " ").split())


def save_images(row, out: Path) -> list[str]:
    """The row's images as PNGs under out/images (atomic); paths relative to `out`."""
    import io

    paths = []
    for j, image in enumerate(row.images):
        rel = f"images/{row.index:08d}_{j}.png"
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(out / rel, buf.getvalue())
        paths.append(rel)
    return paths


def sft_row(rec: dict, fmt: str) -> dict:
    """A kept record in one of the SFT trainer's formats (docs/method.md, "Data rows")."""
    images, prompt, cot = rec["images"], rec["problem"], rec["response"]
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER * len(images) + ("\n" if images else "") + prompt
    if fmt == "llava_cot":
        row = {"id": f"coldstart-{rec['index']:08d}", "image": images[0] if len(images) == 1 else images,
               "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": cot}]}
        return row
    if fmt == "mulberry":
        return {"images": images, "conversations": [{"from": "user", "value": prompt},
                                                    {"from": "assistant", "value": cot}]}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": cot}],
                "images": images}
    raise ValueError(f"unknown output format {fmt!r}; use llava_cot, mulberry or messages")


def assemble(rows, store: ShardStore, out: Path, formats: list[str]) -> Optional[dict]:
    """Once every row has a record: the SFT files and summary.json (each written atomically)."""
    records: dict[int, dict] = {}
    for k in range(store.num_shards):
        records.update(store.load(k))
    missing = [r.index for r in rows if r.index not in records]
    if missing:
        log.info("%d rows have no record yet (e.g. rows %s); the SFT files are written when every shard is done",
                 len(missing), missing[:5])
        return None
    recs = [records[r.index] for r in rows]
    kept = [r for r in recs if r["status"] == "kept"]
    files = {}
    for fmt in formats:
        path = out / f"coldstart_{fmt}.jsonl"
        atomic_write_jsonl(path, (sft_row(r, fmt) for r in kept))
        files[fmt] = str(path)
    summary = summarize(recs)
    summary["files"] = files
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("done: %d rows, %d kept (%.1f%%), filtered %s, failed %s -> %s", summary["rows"], summary["kept"],
             100 * summary["kept_rate"], summary["filtered"], summary["failed"], out)
    return summary


def summarize(recs: list[dict]) -> dict:
    by = {"filtered": Counter(), "failed": Counter()}
    examples: dict[str, list[int]] = {}
    details: dict[str, str] = {}
    for r in recs:
        if r["status"] in by:
            by[r["status"]][r["reason"]] += 1
            examples.setdefault(r["reason"], [])
            if len(examples[r["reason"]]) < MAX_EXAMPLES:
                examples[r["reason"]].append(r["index"])
            if r.get("detail"):
                details.setdefault(r["reason"], r["detail"])
    kept = sum(r["status"] == "kept" for r in recs)
    return {"rows": len(recs), "kept": kept, "kept_rate": kept / max(len(recs), 1),
            "filtered": dict(by["filtered"].most_common()), "failed": dict(by["failed"].most_common()),
            "examples": examples, "details": details}


# ----------------------------------------------------------------------------- inputs and checks


def input_path(cfg) -> Path:
    path = cfg.coldstart.input_path or cfg.data.train_path
    if path is None:
        raise ValueError("coldstart.input_path is not set (nor data.train_path): an RL parquet with images, "
                         "problem and answer columns")
    if not Path(path).is_file():
        raise FileNotFoundError(f"coldstart.input_path {path} does not exist; point it at an RL parquet "
                                "(images, problem, answer)")
    return Path(path)


def load_input(cfg, path: Optional[Path] = None):
    from megatron_vr1.data.rl_dataset import load_rl_rows

    rows = load_rl_rows(path or input_path(cfg))  # bad rows counted, logged, skipped
    return rows[: cfg.coldstart.max_rows] if cfg.coldstart.max_rows else rows


def output_dir(cfg) -> Path:
    return Path(cfg.coldstart.output_dir or Path(cfg.run_dir) / "coldstart")


def load_backends(cfg) -> dict:
    """The MLLM and the reasoner; one engine when both are the same local model."""
    from megatron_vr1.coldstart.backends import make_backend

    cs = cfg.coldstart
    mllm = make_backend(cs.mllm, cfg.model.hf_path, cfg.seed, "mllm")
    same = (cs.mllm.backend == cs.reasoner.backend == "vllm"
            and Path(cs.mllm.path or cfg.model.hf_path) == Path(cs.reasoner.path or cfg.model.hf_path)
            and (cs.mllm.max_model_len, cs.mllm.kv_cache_gib) == (cs.reasoner.max_model_len, cs.reasoner.kv_cache_gib))
    reasoner = mllm if same else make_backend(cs.reasoner, cfg.model.hf_path, cfg.seed, "reasoner")
    return {"mllm": mllm, "reasoner": reasoner}


def check_models(cfg) -> None:
    """Errors about the models before anything is loaded."""
    from megatron_vr1.coldstart.backends import check_local_model

    check_local_model(cfg.coldstart.mllm, cfg.model.hf_path, "mllm")
    check_local_model(cfg.coldstart.reasoner, cfg.model.hf_path, "reasoner")


def _model_key(m) -> dict:
    d = asdict(m)
    for k in ("concurrency", "timeout_s", "max_retries", "backoff_s", "api_key_env", "kv_cache_gib"):
        d.pop(k)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def bridge_fingerprint(cfg, n_rows: int) -> dict:
    cs = cfg.coldstart
    return {"kind": "bridge", "input": str(input_path(cfg)), "rows": n_rows, "num_shards": cs.num_shards,
            "chunk_rows": cs.chunk_rows, "seed": cfg.seed, "mllm": _model_key(cs.mllm),
            "reasoner": _model_key(cs.reasoner), "default_path": str(cfg.model.hf_path),
            "prompts": hashlib.sha256(json.dumps([cs.pseudo_cot_prompt, cs.description_prompt, cs.reasoning_prompt,
                                                  cs.answer_hint, cs.give_answer]).encode()).hexdigest()[:16],
            "filters": hashlib.sha256(json.dumps([cs.rewrite_phrases, cs.forbidden_phrases,
                                                  cs.max_repeats]).encode()).hexdigest()[:16]}


def check_manifest(out: Path, fingerprint: dict) -> None:
    """Pins the settings of an output folder; a rerun with other settings is refused."""
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}' for k in diff)[:600]}); "
                "use another coldstart.output_dir, or delete that folder to start over")
        return
    atomic_write_text(path, json.dumps(fingerprint, indent=2) + "\n")


def _shards(shard: Optional[int], num_shards: int) -> list[int]:
    if shard is None:
        return list(range(num_shards))
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} is out of range: coldstart.num_shards is {num_shards}, "
                         f"so use 0..{num_shards - 1}")
    return [shard]
