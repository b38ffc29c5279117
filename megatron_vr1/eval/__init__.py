"""Benchmark evaluation (issue 7): MathVista, MathVerse, MM-Math, MathVision, DynaMath.

`megatron-vr1 eval --model DIR --bench mathvista,mathverse --data DIR [--out DIR]` runs, in order:

  loaders.load_benchmark   each benchmark's published file format -> `EvalSample`s (all input is
                           checked here, before any model is loaded)
  runner.generate          vLLM (`VLLMEngine`), temperature 0.6 / top_p 0.95 / 16000 new tokens by
                           default; a response without `</answer>` is sampled again (up to 5 times)
  scoring.score_sample     answer extraction and the benchmark's rules
  judge.JudgeClient        optional LLM judge on any OpenAI-compatible endpoint
  report.write_results     one JSONL per benchmark, summary.json, results.md (with the paper's numbers)
"""

from megatron_vr1.eval.loaders import BENCHMARKS, EvalSample, load_benchmark, parse_bench_list
from megatron_vr1.eval.scoring import Extraction, extract_prediction, score_sample

__all__ = [
    "BENCHMARKS",
    "EvalSample",
    "Extraction",
    "extract_prediction",
    "load_benchmark",
    "parse_bench_list",
    "score_sample",
]
