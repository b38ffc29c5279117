"""Results: one JSONL per benchmark, summary.json and a Markdown table next to the paper's numbers.

Files are written to a temporary name in the output folder and renamed into place, so a reader
never sees half a file. Accuracy is reported twice: "no retry" scores each sample's first
response, "accuracy" its last one (a response without `</answer>` sampled again, Vision-R1's
protocol). Lengths are response tokens of the last responses.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

PAPER = {
    "7B": {
        "Qwen2.5-VL-7B": {"mathvista": 68.1, "mathverse": 46.7, "mmmath": 34.1},
        "Vision-R1-7B": {"mathvista": 73.5, "mathverse": 52.4, "mmmath": 40.2},
    },
    "72B": {
        "Vision-R1-72B": {"mathvista": 78.2, "mathverse": 63.2, "mmmath": 59.3},
    },
}
"""Reported accuracy (%) by model size (Vision-R1 README; docs/method.md, "Evaluation")."""

SIZES = {(2048, 36): "3B", (3584, 28): "7B", (5120, 64): "32B", (8192, 80): "72B"}
"""(text hidden size, layers) of the Qwen2.5-VL family -> size name."""


def model_size(hidden_size: int, num_layers: int) -> str | None:
    return SIZES.get((hidden_size, num_layers))


def length_stats(lengths: list[int]) -> dict:
    """mean / p50 / p90 / max (nearest-rank percentiles) of response lengths in tokens."""
    if not lengths:
        return {"mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return ordered[max(0, -(-len(ordered) * q // 100) - 1)]

    return {"mean": sum(ordered) / len(ordered), "p50": rank(50), "p90": rank(90), "max": ordered[-1]}


def _acc(records: list[dict], key: str) -> float:
    return 100.0 * sum(bool(r[key]) for r in records) / len(records) if records else 0.0


def summarize(bench: str, records: list[dict], files: list[str], skipped: dict) -> dict:
    """Accuracy (with and without retry, judge), length statistics (of the responses generated)
    and per-category accuracy."""
    sent = [r for r in records if r["finish_reason"] != "prompt_too_long"]
    out = {
        "bench": bench, "files": files, "n": len(records), "skipped": skipped,
        "accuracy": _acc(records, "correct"), "accuracy_no_retry": _acc(records, "correct_no_retry"),
        "retried": sum(r["attempts"] > 1 for r in records),
        "no_answer_tag": sum("</answer>" not in r["response"] for r in records),
        "prompt_too_long": sum(r["finish_reason"] == "prompt_too_long" for r in records),
        "truncated": sum(r["finish_reason"] == "length" for r in records),
        "length": length_stats([r["response_tokens"] for r in sent]),
        "length_no_retry": length_stats([r["first_response_tokens"] for r in sent]),
    }
    judged = [r for r in records if r.get("judge")]
    if judged:
        ok = [r for r in judged if r["judge"]["status"] == "ok"]
        out["judge"] = {"accuracy": 100.0 * sum(r["judge"]["verdict"] is True for r in judged) / len(judged),
                        "judged": len(ok), "failed": len(judged) - len(ok)}
    cats: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        for name, values in r["categories"].items():
            for v in values:
                cats.setdefault(name, {}).setdefault(v, []).append(r)
    out["categories"] = {
        name: {v: {"n": len(rs), "accuracy": _acc(rs, "correct"), "accuracy_no_retry": _acc(rs, "correct_no_retry")}
               for v, rs in sorted(groups.items())}
        for name, groups in cats.items()
    }
    if bench == "dynamath":
        seeds: dict[str, list[dict]] = {}
        for r in records:
            seeds.setdefault(r["group"], []).append(r)
        out["seeds"] = len(seeds)
        out["worst_case_accuracy"] = 100.0 * sum(all(r["correct"] for r in rs) for rs in seeds.values()) / len(seeds)
    return out


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, records: list[dict]) -> None:
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def markdown(summaries: list[dict], settings: dict, size: str | None, size_note: str) -> str:
    """The results table per benchmark (next to the paper's numbers for this size) and per category."""
    paper = PAPER.get(size or "", {})
    judge = any("judge" in s for s in summaries)
    lines = [f"# Evaluation of {settings['model']}", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in settings.items() if k != "model"))
    lines.append("")
    lines.append(size_note)
    lines.append("")
    head = ["benchmark", "n", "accuracy", "no retry"] + (["judge", "judge failed"] if judge else [])
    head += [f"{name} (paper)" for name in paper]
    head += ["len mean", "p50", "p90", "max", "retried"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, s: dict, acc: float, acc_first: float, n: int, bench: str, lengths: bool = True) -> None:
        cells = [label, str(n), _fmt(acc), _fmt(acc_first)]
        if judge:
            j = s.get("judge") if lengths else None
            cells += [_fmt(j["accuracy"]) if j else "—", str(j["failed"]) if j else "—"]
        cells += [_fmt(numbers.get(bench)) if lengths else "—" for numbers in paper.values()]
        if lengths:
            st = s["length"]
            cells += [f"{st['mean']:.1f}", str(st["p50"]), str(st["p90"]), str(st["max"]), str(s["retried"])]
        else:
            cells += ["", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")

    for s in summaries:
        row(s["bench"], s, s["accuracy"], s["accuracy_no_retry"], s["n"], s["bench"])
        if s["bench"] == "mathverse" and "Vision Only" in s["categories"].get("version", {}):
            c = s["categories"]["version"]["Vision Only"]
            row("mathverse (Vision Only)", s, c["accuracy"], c["accuracy_no_retry"], c["n"], "", lengths=False)
        if s["bench"] == "dynamath":
            lines.append(f"| dynamath worst case ({s['seeds']} seeds) | {s['seeds']} | {_fmt(s['worst_case_accuracy'])}"
                         " |" + " |" * (len(head) - 3))
    for s in summaries:
        for name, groups in s["categories"].items():
            lines += ["", f"## {s['bench']} by {name}", "", f"| {name} | n | accuracy | no retry |",
                      "|---|---|---|---|"]
            lines += [f"| {v} | {c['n']} | {_fmt(c['accuracy'])} | {_fmt(c['accuracy_no_retry'])} |"
                      for v, c in groups.items()]
        if s["prompt_too_long"]:
            lines += ["", f"{s['bench']}: {s['prompt_too_long']} prompt(s) did not fit --max-model-len (scored wrong)"]
        if s["skipped"]:
            lines += ["", f"{s['bench']}: rows left out (--skip-bad-rows): {s['skipped']}"]
    return "\n".join(lines) + "\n"


def write_results(out: Path, per_bench: dict[str, list[dict]], summaries: list[dict], settings: dict,
                  size: str | None, size_note: str) -> dict[str, Path]:
    """<bench>.jsonl, summary.json and results.md in `out` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for bench, records in per_bench.items():
        paths[bench] = out / f"{bench}.jsonl"
        write_jsonl(paths[bench], records)
    paper = {name: {b: v for b, v in numbers.items()} for name, numbers in PAPER.get(size or "", {}).items()}
    summary = {"settings": settings, "model_size": size, "paper": paper, "benchmarks": summaries}
    paths["summary"] = out / "summary.json"
    _atomic_write(paths["summary"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    paths["markdown"] = out / "results.md"
    _atomic_write(paths["markdown"], markdown(summaries, settings, size, size_note))
    return paths
