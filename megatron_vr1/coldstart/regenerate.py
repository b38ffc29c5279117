"""OpenVLThinker's data step: the RL model answers the rows again and the SFT data is rebuilt.

Per row: `coldstart.loop.samples` (k) responses to the RL prompt (the same chat prompt as GRPO:
`data.system_prompt`, images where the `<image>` placeholders are), scored with the RL reward
(HFRRF: format and answer); the shortest correct one (fewest tokens; ties: first sampled) is kept,
its reasoning cut before the first `coldstart.loop.truncate_at` marker ("Wait,"). Rows with no
correct response are dropped (`no_correct_sample`). The engine uses coldstart.mllm's engine
settings (max_model_len, kv_cache_gib, structured_regex) on the RL model's HF export.

Same crash-safety as the bridging generator (`bridge.run_chunks`): records in a shard file,
a rerun skips finished rows, the output `coldstart_messages.jsonl` is assembled atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_vr1.coldstart.bridge import (
    assemble, check_manifest, input_path, load_input, new_record, run_chunks, save_images,
)
from megatron_vr1.coldstart.store import ShardStore

OUTPUT_FORMAT = "messages"
"""OpenVLThinker's SFT rows: {"messages": [...], "images": [...]}."""


def regenerate(cfg, hf_dir, out) -> dict:
    """Rebuild the SFT data with the model in `hf_dir` into `out`; returns the summary."""
    loop = cfg.coldstart.loop
    hf_dir, out = Path(hf_dir), Path(out)
    mcfg = cfg.coldstart.mllm
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not an HF model folder (no config.json); export the RL checkpoint "
                                "first: megatron-vr1 convert mcore-to-hf --mcore <ckpt> --out <folder>")
    source = Path(loop.data_path) if loop.data_path else input_path(cfg)
    if not source.is_file():
        raise FileNotFoundError(f"coldstart.loop.data_path {source} does not exist; point it at an RL parquet")
    rows = load_input(cfg, source)
    check_manifest(out, {
        "kind": "regenerate", "model": str(hf_dir), "input": str(source), "rows": len(rows), "seed": cfg.seed,
        "chunk_rows": cfg.coldstart.chunk_rows, "samples": loop.samples, "temperature": loop.temperature,
        "top_p": loop.top_p, "max_tokens": loop.max_tokens, "truncate_at": loop.truncate_at,
        "regex": mcfg.structured_regex, "max_model_len": mcfg.max_model_len,
        "system_prompt": hashlib.sha256(json.dumps(cfg.data.system_prompt).encode()).hexdigest()[:16]})
    store = ShardStore(out / "shards", 1)
    sampling = {"max_tokens": loop.max_tokens, "temperature": loop.temperature, "top_p": loop.top_p,
                "structured_regex": mcfg.structured_regex}
    engine = []

    def prepare():
        from megatron_vr1.coldstart.backends import VLLMBackend

        engine.append(VLLMBackend(hf_dir, mcfg, seed=cfg.seed, name="loop"))

    def process(chunk):
        return regenerate_chunk(chunk, engine[0], sampling, loop, cfg.data.system_prompt, out)

    try:
        run_chunks(rows, store, [0], cfg.coldstart.chunk_rows, process, "regenerate", prepare)
    finally:
        for e in engine:
            e.close()
    return assemble(rows, store, out, [OUTPUT_FORMAT])


def regenerate_chunk(rows, backend, sampling: dict, loop, system_prompt, out: Path) -> list[dict]:
    from megatron_vr1.coldstart.backends import ChatRequest
    from megatron_vr1.coldstart.filters import truncate_reflection
    from megatron_vr1.rewards import hard_format_result_reward

    results = backend.generate([ChatRequest(r.problem, r.images, system=system_prompt) for r in rows],
                               n=loop.samples, sampling=sampling)
    recs = []
    for r, res in zip(rows, results):
        rec = new_record(r)
        if res.error is not None:
            rec.update(status="failed", reason="generate_error", detail=res.error[:500])
            recs.append(rec)
            continue
        samples = []
        for c in res.completions:
            ok = c.finish_reason == "stop" and hard_format_result_reward(c.text, r.answer).reward == 1.0
            samples.append({"text": c.text, "tokens": c.num_tokens if c.num_tokens is not None else len(c.text),
                            "correct": ok})
        rec["samples"] = samples
        correct = [s for s in samples if s["correct"]]
        if not correct:
            rec.update(status="filtered", reason="no_correct_sample")
        else:
            best = min(correct, key=lambda s: s["tokens"])  # min keeps the first of equals
            rec.update(status="kept", reason="kept", response=truncate_reflection(best["text"], loop.truncate_at),
                       images=save_images(r, out))
        recs.append(rec)
    return recs
