"""The evaluation run: check inputs -> (export) -> generate with retry -> score -> judge -> write.

Every user mistake (unknown benchmark, missing or malformed data, a model folder that is neither
HF nor a megatron-vr1 checkpoint, bad judge settings) raises before the model is loaded. A
Megatron checkpoint (`megatron_vr1.json` + `model/`) is exported to HF in a temporary folder
(`checkpoints_conv.mcore_to_hf`) and evaluated from there.

`responses` (a previous run's output folder) re-scores its recorded responses instead of
generating: new rules or a judge on old generations, without a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megatron_vr1.eval.loaders import EvalSample, LoadedBenchmark, load_benchmark, load_image
from megatron_vr1.eval.report import model_size, summarize, write_results
from megatron_vr1.eval.scoring import extract_prediction, score_sample

logger = logging.getLogger(__name__)

ANSWER_END = "</answer>"


@dataclass
class JudgeSettings:
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 3
    workers: int = 4


@dataclass
class EvalSettings:
    benches: list[str]
    data: Path
    out: Path
    model: Path | None = None
    """An HF folder or a megatron-vr1 (Megatron) checkpoint folder."""
    files: dict[str, Path] = field(default_factory=dict)
    limit: int | None = None
    skip_bad_rows: bool = False
    max_new_tokens: int = 16000
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    retries: int = 5
    """Samples again (up to this many times) a response without `</answer>`."""
    max_model_len: int = 32768
    kv_cache_gib: float = 1.0
    """vLLM KV cache on CPU (GPU: gpu_memory_utilization)."""
    gpu_memory_utilization: float = 0.85
    dtype: str | None = None
    """None: float32 on CPU, the checkpoint's dtype on GPU."""
    batch_size: int = 256
    """Prompts per generate call (bounds the decoded images held at once)."""
    system_prompt: str | None = None
    paper_size: str | None = None
    judge: JudgeSettings | None = None
    responses: Path | None = None


@dataclass
class Generation:
    response: str
    tokens: int
    finish_reason: str
    attempts: int
    first_response: str
    first_tokens: int
    prompt_tokens: int = 0
    """Prompt length with the image tokens expanded (the engine's count; an estimate if not sent)."""


# ----------------------------------------------------------------------------- checks


def check_settings(s: EvalSettings) -> None:
    for name, value, low in (("--max-new-tokens", s.max_new_tokens, 1), ("--max-model-len", s.max_model_len, 2),
                             ("--batch-size", s.batch_size, 1), ("--retries", s.retries, 0)):
        if value < low:
            raise ValueError(f"{name} ({value}) must be >= {low}")
    if not 0 <= s.temperature:
        raise ValueError(f"--temperature ({s.temperature}) must be >= 0")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"--top-p ({s.top_p}) must be in (0, 1]")
    if s.kv_cache_gib <= 0:
        raise ValueError(f"--kv-cache-gib ({s.kv_cache_gib}) must be > 0")
    if s.paper_size is not None and s.paper_size not in ("3B", "7B", "32B", "72B"):
        raise ValueError(f"--paper-size {s.paper_size!r}: use 3B, 7B, 32B or 72B")
    if s.responses is None and s.model is None:
        raise ValueError("--model is required (an HF folder or a megatron-vr1 checkpoint), "
                         "unless --responses re-scores a run")
    if s.responses is not None and not s.responses.is_dir():
        raise FileNotFoundError(f"--responses {s.responses} is not a folder; pass the --out folder of an earlier run")
    if s.model is not None and s.responses is None:
        model_kind(s.model)
    if s.judge is not None:
        from megatron_vr1.eval.judge import JudgeClient

        JudgeClient(s.judge.url, s.judge.model, None, s.judge.timeout_s, s.judge.retries)
        if s.judge.workers < 1:
            raise ValueError(f"--judge-workers ({s.judge.workers}) must be >= 1")
    for bench in s.files:
        if bench not in s.benches:
            raise ValueError(f"--file {bench}=...: {bench} is not in --bench {','.join(s.benches)}")


def model_kind(path: Path) -> str:
    """"hf" for an HF folder, "mcore" for a megatron-vr1 checkpoint; FileNotFoundError otherwise."""
    if (path / "config.json").is_file():
        return "hf"
    if (path / "megatron_vr1.json").is_file() and (path / "model").is_dir():
        return "mcore"
    raise FileNotFoundError(
        f"--model {path}: neither an HF folder (config.json + weights) nor a megatron-vr1 checkpoint "
        "(megatron_vr1.json + model/); pass e.g. runs/tiny/rl/checkpoints/best or an exported HF folder"
    )


@contextlib.contextmanager
def hf_model_dir(path: Path) -> Iterator[Path]:
    """The HF folder to serve: `path` itself, or a temporary export of a Megatron checkpoint."""
    if model_kind(path) == "hf":
        yield path
        return
    from checkpoints_conv.convert import mcore_to_hf

    with tempfile.TemporaryDirectory(prefix="vr1-eval-hf-") as tmp:
        out = Path(tmp) / "hf"
        t0 = time.perf_counter()
        mcore_to_hf(path, out, progress=False)
        logger.info("exported %s to HF in %.1f s", path, time.perf_counter() - t0)
        yield out


# ----------------------------------------------------------------------------- generation


def sample_prompt(sample: EvalSample, processor, system_prompt: str | None, index: int = 0):
    """The chat prompt of a benchmark sample, rendered exactly as the trainer renders an RL row
    (`data.rl_dataset.build_prompt`); its images are decoded here. `index` (the sample's position)
    only names the sample in an error."""
    from megatron_vr1.data.rl_dataset import RLRow, build_prompt

    row = RLRow(images=[load_image(ref) for ref in sample.images], problem=sample.prompt, answer=sample.answer,
                index=index)
    return build_prompt(row, processor, system_prompt)


def prompt_tokens(prompt, processor) -> int | None:
    """Tokens of a chat-templated prompt with each image's `<|image_pad|>` expanded, computed the
    way the Qwen2.5-VL processor resizes images (None if the processor is not of that kind)."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = processor.image_processor
        factor = ip.patch_size * ip.merge_size
        n = len(processor.tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
        for image in prompt.images:
            h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=ip.size["shortest_edge"],
                                max_pixels=ip.size["longest_edge"])
            n += (h // factor) * (w // factor) - 1
        return n
    except (AttributeError, KeyError, TypeError, ImportError, ValueError):
        return None


def generate_with_retry(engine, prompts: list, s: EvalSettings, seed: int, max_len: int,
                        lengths: list[int | None]) -> list[Generation]:
    """One response per prompt; a response without `</answer>` is sampled again, up to `s.retries` times.
    A prompt with no room left under `max_len` is not sent (finish_reason "prompt_too_long")."""
    from megatron_vr1.rollout.engine import SamplingSettings

    def sampling(attempt: int) -> SamplingSettings:
        return SamplingSettings(n=1, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                seed=seed + 1000003 * attempt)

    sendable = [i for i, n in enumerate(lengths) if n is None or n < max_len]
    out = [Generation("", 0, "prompt_too_long", 0, "", 0, n or 0) for n in lengths]
    if len(sendable) < len(prompts):
        logger.warning("%d prompt(s) of %d tokens or more do not fit --max-model-len %d; scored as wrong "
                       "(raise --max-model-len)", len(prompts) - len(sendable), max_len, max_len)
    if not sendable:
        return out
    try:
        first = [g[0] for g in engine.generate([prompts[i] for i in sendable], sampling(0))]
    except Exception as e:
        if "maximum context length" in str(e):
            raise ValueError(f"{e} (raise --max-model-len)") from None
        raise
    final, attempts = list(first), [1] * len(sendable)
    for attempt in range(1, s.retries + 1):
        todo = [k for k, r in enumerate(final) if ANSWER_END not in r.response_text]
        if not todo:
            break
        again = engine.generate([prompts[sendable[k]] for k in todo], sampling(attempt))
        for k, group in zip(todo, again):
            final[k], attempts[k] = group[0], attempts[k] + 1
    for k, i in enumerate(sendable):
        r, f = final[k], first[k]
        out[i] = Generation(r.response_text, len(r.response_ids), r.finish_reason, attempts[k], f.response_text,
                            len(f.response_ids), len(r.prompt_ids))
    return out


def generate_all(hf_dir: Path, loaded: list[LoadedBenchmark], s: EvalSettings) -> dict[str, list[Generation]]:
    import torch

    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    arch = load_hf_arch(hf_dir)
    processor = load_processor(hf_dir)
    max_len = min(s.max_model_len, arch.text.max_position_embeddings)
    if max_len < s.max_model_len:
        logger.warning("--max-model-len %d is above the model's max_position_embeddings; using %d", s.max_model_len,
                       max_len)
    dtype = s.dtype or ("auto" if torch.cuda.is_available() else "float32")
    max_images = max((len(x.images) for b in loaded for x in b.samples), default=1) or 1
    engine = VLLMEngine(hf_dir, arch, dtype=dtype, max_model_len=max_len, kv_cache_bytes=int(s.kv_cache_gib * 2**30),
                        gpu_memory_utilization=s.gpu_memory_utilization, max_images_per_prompt=max_images,
                        seed=s.seed)
    out: dict[str, list[Generation]] = {}
    try:
        for b in loaded:
            gens: list[Generation] = []
            t0 = time.perf_counter()
            for start in range(0, len(b.samples), s.batch_size):
                chunk = b.samples[start : start + s.batch_size]
                prompts = [sample_prompt(x, processor, s.system_prompt, start + k) for k, x in enumerate(chunk)]
                lengths = [prompt_tokens(p, processor) for p in prompts]
                gens += generate_with_retry(engine, prompts, s, s.seed + start, max_len, lengths)
            logger.info("%s: %d responses in %.1f s", b.name, len(gens), time.perf_counter() - t0)
            out[b.name] = gens
    finally:
        engine.shutdown()
    return out


def load_responses(folder: Path, loaded: list[LoadedBenchmark]) -> dict[str, list[Generation]]:
    """The responses an earlier run recorded (`<bench>.jsonl` by sample id), for re-scoring."""
    out = {}
    for b in loaded:
        path = folder / f"{b.name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--responses {folder} has no {path.name}; it holds the runs of "
                                    f"{', '.join(p.stem for p in folder.glob('*.jsonl')) or 'no benchmark'}")
        by_id = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    r = json.loads(line)
                    by_id[str(r["id"])] = Generation(r["response"], int(r.get("response_tokens", 0)),
                                                     r.get("finish_reason", "stop"), int(r.get("attempts", 1)),
                                                     r.get("first_response", r["response"]),
                                                     int(r.get("first_response_tokens", r.get("response_tokens", 0))),
                                                     int(r.get("prompt_tokens", 0)))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}: line {n} is not a response record ({type(e).__name__}: {e}); "
                                     "it needs at least id and response") from None
        missing = [x.id for x in b.samples if x.id not in by_id]
        if missing:
            raise ValueError(f"{path} has no response for {len(missing)} sample(s) of {b.name} (e.g. id "
                             f"{missing[0]!r}); re-score with the same data and --limit as that run")
        out[b.name] = [by_id[x.id] for x in b.samples]
    return out


# ----------------------------------------------------------------------------- scoring


def score_records(b: LoadedBenchmark, gens: list[Generation], checker=None) -> list[dict]:
    records = []
    for x, g in zip(b.samples, gens):
        final, first = extract_prediction(g.response), extract_prediction(g.first_response)
        verdict = score_sample(x, final.text, checker)
        first_verdict = verdict if g.first_response == g.response else score_sample(x, first.text, checker)
        records.append({
            "bench": x.bench, "id": x.id, "group": x.group, "categories": x.categories, "question": x.question,
            "prompt": x.prompt, "answer": x.answer, "kind": x.kind, "choices": x.choices,
            "prompt_tokens": g.prompt_tokens, "response": g.response, "response_tokens": g.tokens,
            "finish_reason": g.finish_reason,
            "attempts": g.attempts, "first_response": g.first_response, "first_response_tokens": g.first_tokens,
            "extracted": final.text, "extracted_by": final.method, "rule": verdict.rule,
            "correct": verdict.correct, "correct_no_retry": first_verdict.correct, "judge": None,
        })
    return records


def run_judge(s: EvalSettings, loaded: list[LoadedBenchmark], per_bench: dict[str, list[dict]]) -> None:
    from megatron_vr1.eval.judge import JudgeClient

    j = s.judge
    client = JudgeClient(j.url, j.model, os.environ.get(j.api_key_env) or None, j.timeout_s, j.retries)
    for b in loaded:
        records = per_bench[b.name]
        results = client.judge_many([(x, r["response"]) for x, r in zip(b.samples, records)], workers=j.workers)
        for r, res in zip(records, results):
            r["judge"] = res.to_dict()
        failed = sum(res.status != "ok" for res in results)
        if failed:
            logger.warning("%s: the judge failed on %d of %d samples (recorded as failed)", b.name, failed,
                           len(results))


def run_eval(s: EvalSettings) -> dict:
    """Runs the evaluation; returns {"summaries", "paths", "seconds"}."""
    t0 = time.perf_counter()
    check_settings(s)
    loaded = [load_benchmark(name, s.data, s.files.get(name), s.limit, s.skip_bad_rows) for name in s.benches]
    for b in loaded:
        logger.info("%s: %d samples from %s", b.name, len(b.samples), ", ".join(map(str, b.files)))
    s.out.mkdir(parents=True, exist_ok=True)
    arch_size, arch_text = None, ""
    if s.responses is not None:
        gens = load_responses(s.responses, loaded)
        model_label = f"responses of {s.responses}"
    else:
        with hf_model_dir(s.model) as hf_dir:
            gens = generate_all(hf_dir, loaded, s)
            arch_size, arch_text = _arch_size(hf_dir)
        model_label = str(s.model)
    per_bench = {b.name: score_records(b, gens[b.name]) for b in loaded}
    if s.judge is not None:
        run_judge(s, loaded, per_bench)
    summaries = [summarize(b.name, per_bench[b.name], [str(f) for f in b.files], b.skipped) for b in loaded]
    if s.paper_size:
        size, note = s.paper_size, f"Paper numbers: {s.paper_size} models (--paper-size)."
    elif arch_size:
        size, note = arch_size, f"Paper numbers: {arch_size} models (matched from the model's config)."
    else:
        size = None
        note = ("No published numbers for this model size" + (f" ({arch_text})" if arch_text else "") +
                "; pass --paper-size 7B to compare anyway.")
    settings = {"model": model_label, "temperature": s.temperature, "top_p": s.top_p,
                "max_new_tokens": s.max_new_tokens, "retries": s.retries, "seed": s.seed,
                "system_prompt": s.system_prompt, "judge": s.judge.model if s.judge else None}
    paths = write_results(s.out, per_bench, summaries, settings, size, note)
    return {"summaries": summaries, "paths": {k: str(v) for k, v in paths.items()}, "seconds": time.perf_counter() - t0}


def _arch_size(hf_dir: Path) -> tuple[str | None, str]:
    from megatron_vr1.config import load_hf_arch

    arch = load_hf_arch(hf_dir)
    return model_size(arch.text.hidden_size, arch.text.num_layers), (
        f"hidden {arch.text.hidden_size}, {arch.text.num_layers} layers")
