"""Benchmark evaluation (issue 7): loaders on fixture files in each benchmark's published schema,
rule scoring with tricky answers, the LLM judge against a real local HTTP server (retry, timeout,
no retry on 401), re-scoring through the CLI with known results, and the tiny model end to end
through `megatron-vr1 eval` with the real vLLM engine (from a Megatron checkpoint, exported first)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_vr1 import cli
from megatron_vr1.eval.judge import JudgeClient, chat_completions_url, judge_messages, parse_verdict
from megatron_vr1.eval.loaders import BENCHMARKS, load_benchmark, parse_bench_list, parse_choices, last_boxed
from megatron_vr1.eval.report import length_stats, model_size
from megatron_vr1.eval.scoring import extract_prediction, option_letter, parse_number, score_sample, strip_units

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
ALL = "mathvista,mathverse,mmmath,mathvision,dynamath"
MAX_LEN = 200
"""--max-model-len of the end-to-end run: some fixture prompts do not fit (tested), most do."""


def samples(bench: str) -> dict:
    return {s.id: s for s in load_benchmark(bench, FIXTURES).samples}


# ----------------------------------------------------------------------------- loaders


def test_loaders_read_each_published_schema():
    got = {b: load_benchmark(b, FIXTURES) for b in BENCHMARKS}
    assert {b: len(x.samples) for b, x in got.items()} == {
        "mathvista": 4, "mathverse": 5, "mmmath": 5, "mathvision": 3, "dynamath": 6}
    vista = samples("mathvista")
    # multiple choice: the answer is the choice text, scored by letter; the published query is the prompt
    assert vista["1"].kind == "choice" and vista["1"].answer_letter == "A" and vista["1"].answer_text == "145°"
    assert vista["1"].prompt.startswith("<image>Hint: Please answer the question and provide the correct option letter")
    assert vista["1"].categories == {"task": ["GPS"], "skill": ["GEO", "ALG"]}
    # no `query` field: rebuilt from MathVista's hint template
    assert "requiring an integer answer" in vista["2"].prompt and vista["2"].unit == "cm"
    assert vista["3"].kind == "float" and vista["3"].precision == 1
    verse = samples("mathverse")
    assert verse["1"].choices == ["30°", "45°", "60°", "90°"] and verse["1"].answer_text == "60°"
    assert verse["4"].images == [] and "<image>" not in verse["4"].prompt  # Text Only has no image
    assert verse["2"].categories["version"] == ["Vision Only"] and verse["2"].question  # question from query_wo
    mm = samples("mmmath")
    assert [mm[i].answer for i in sorted(mm)] == ["\\frac{1}{3}", "2\\sqrt{3}", "60^\\circ", "2, 3", "25"]
    assert mm["0"].tolerance == 1e-2 and mm["2"].categories["knowledge"] == ["Properties of Shapes",
                                                                              "Transformations of Shapes"]
    vision = samples("mathvision")
    assert vision["1"].prompt.startswith("<image>How many circles") and "(E) 7" in vision["1"].prompt
    assert "in the image is 48" in vision["2"].prompt and vision["2"].kind == "expr"
    dyna = load_benchmark("dynamath", FIXTURES)
    assert [f.name for f in dyna.files] == ["sample_variant1.json", "sample_variant2.json"]
    assert [s.id for s in dyna.samples] == ["1-v1", "2-v1", "3-v1", "1-v2", "2-v2", "3-v2"]
    assert {s.group for s in dyna.samples} == {"1", "2", "3"}
    # --limit N: DynaMath keeps every variant of the first N seed questions
    assert [s.id for s in load_benchmark("dynamath", FIXTURES, limit=2).samples] == ["1-v1", "2-v1", "1-v2", "2-v2"]
    assert len(load_benchmark("mathvista", FIXTURES, limit=2).samples) == 2


def test_hf_parquet_with_image_bytes_loads_like_the_json(tmp_path):
    """MathVista as published on the Hugging Face hub: parquet with `decoded_image` cells {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(json.loads((FIXTURES / "mathvista/testmini.json").read_text()).values())
    for r in rows:
        r["decoded_image"] = {"bytes": (FIXTURES / "mathvista" / r["image"]).read_bytes(), "path": None}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "testmini-00000-of-00001.parquet")
    from_parquet = load_benchmark("mathvista", tmp_path).samples
    from_json = load_benchmark("mathvista", FIXTURES).samples
    assert [(x.id, x.answer, x.kind, x.prompt, x.categories) for x in from_parquet] == [
        (x.id, x.answer, x.kind, x.prompt, x.categories) for x in from_json]
    assert all(isinstance(x.images[0], bytes) for x in from_parquet)


def test_parse_helpers():
    assert parse_choices("Is it? Choices: (A) yes (B) no") == ["yes", "no"]
    assert parse_choices("Find x.\nChoices:\nA:30°\nB:45°\nC:60°") == ["30°", "45°", "60°"]
    assert parse_choices("Find x (B) only") is None
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
    assert parse_bench_list("MathVista, mm-math,dynamath") == ["mathvista", "mmmath", "dynamath"]
    assert model_size(3584, 28) == "7B" and model_size(128, 4) is None
    assert length_stats([5, 1, 3, 2, 4, 10, 7, 8, 9, 6]) == {"mean": 5.5, "p50": 5, "p90": 9, "max": 10}


# ----------------------------------------------------------------------------- scoring

SCORING = [
    # MathVista multiple choice: letter, or the right choice's text (unit or not); another choice's text fails
    ("mathvista", "1", "A", True), ("mathvista", "1", "Option A", True), ("mathvista", "1", "145°", True),
    ("mathvista", "1", "145", True), ("mathvista", "1", "35°", False), ("mathvista", "1", "(B) 35°", False),
    # integer with the row's unit; strict integers
    ("mathvista", "2", "12 cm", True), ("mathvista", "2", "12.0", True), ("mathvista", "2", "24/2", False),
    ("mathvista", "2", "12.5", False),
    # float rounded to the row's precision (1 decimal), LaTeX fraction accepted
    ("mathvista", "3", "1.52", True), ("mathvista", "3", "\\frac{3}{2}", True), ("mathvista", "3", "1.44", False),
    ("mathvista", "4", "[2,3,5]", True), ("mathvista", "4", "[2, 3, 4]", False), ("mathvista", "4", "[2, 3]", False),
    # MathVerse: letter truth, choice text from the question; free-form through math-verify
    ("mathverse", "1", "60°", True), ("mathverse", "1", "C: 60°", True), ("mathverse", "1", "45°", False),
    ("mathverse", "2", "B", True), ("mathverse", "3", "1.5", True), ("mathverse", "3", "\\dfrac{3}{2}", True),
    ("mathverse", "3", "2/3", False), ("mathverse", "4", "\\sqrt{12}", True), ("mathverse", "4", "3.46", False),
    # MM-Math: numeric tolerance 1e-2, units and degrees stripped, unordered multi-answers
    ("mmmath", "0", "0.33", True), ("mmmath", "0", "0.3", False), ("mmmath", "0", "\\frac{2}{6}", True),
    ("mmmath", "1", "3.46", True), ("mmmath", "1", "3.4", False), ("mmmath", "2", "60^{\\circ}", True),
    ("mmmath", "3", "3, 2", True), ("mmmath", "3", "x=2, x=3", True), ("mmmath", "3", "2", False),
    ("mmmath", "4", "25 cm^2", True), ("mmmath", "4", "24.9", False),
    # MathVision: option text vs letter, LaTeX option text
    ("mathvision", "1", "4", True), ("mathvision", "1", "5", False), ("mathvision", "3", "0.5", True),
    ("mathvision", "3", "C", False), ("mathvision", "2", "12", True),
    # DynaMath: float within 1e-3, choice text, case-insensitive text
    ("dynamath", "1-v1", "2.094", True), ("dynamath", "1-v1", "2.09", False), ("dynamath", "2-v1", "no", True),
    ("dynamath", "2-v1", "(A) yes", False), ("dynamath", "3-v1", "may", True), ("dynamath", "3-v2", "June.", True),
    # no answer at all
    ("mathvista", "2", None, False),
]


def test_scoring_rules_on_fixture_rows():
    by_bench = {b: samples(b) for b in BENCHMARKS}
    got = [(b, i, p, score_sample(by_bench[b][i], p).correct) for b, i, p, _ in SCORING]
    assert got == SCORING


def test_choice_text_that_starts_like_a_letter():
    from megatron_vr1.eval.loaders import EvalSample

    x = EvalSample("mathvista", "x", "<image>q", [], "A bird", "choice", "q", choices=["A cat", "A dog", "A bird"])
    assert x.answer_letter == "C"
    got = {p: score_sample(x, p).correct for p in ("A bird", "a bird.", "C", "(C) A bird", "A cat", "A")}
    assert got == {"A bird": True, "a bird.": True, "C": True, "(C) A bird": True, "A cat": False, "A": False}


def test_extraction_and_number_parsing():
    assert extract_prediction("<think>x</think><answer>Final Answer: $\\frac{1}{2}$</answer>").text == "\\frac{1}{2}"
    e = extract_prediction("so the result follows.\nFinal Answer: 12 cm\nDone")
    assert (e.text, e.method) == ("12 cm", "final_answer")
    assert extract_prediction("we get \\boxed{7} then \\boxed{8}") .text == "8"
    assert extract_prediction("<answer>3") == extract_prediction("nothing here")  # no closing tag: nothing
    assert extract_prediction("nothing here").method == "none"
    assert parse_number("2\\sqrt{3}") == pytest.approx(3.4641016)
    assert parse_number("-\\frac{\\sqrt{3}}{2}") == pytest.approx(-0.8660254)
    assert parse_number("1,000 m") == 1000 and parse_number("3\\pi") == pytest.approx(9.42477796)
    assert parse_number("x^2") is None and parse_number("1/0") is None
    assert strip_units("5\\text{ cm}^2") == "5" and strip_units("30^{\\circ}") == "30"
    assert option_letter("The answer is (B)") == "B" and option_letter("a") is None


# ----------------------------------------------------------------------------- judge server


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-style chat-completions endpoint. /ok grades for real (CORRECT iff the ground truth's
    text is the response's <answer>); /flaky answers 503 to its first two requests; /hang never
    answers in time; /denied answers 401."""

    hits: dict = {}
    release = threading.Event()

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        route = self.path.split("/")[1]
        FakeJudge.hits[route] = FakeJudge.hits.get(route, 0) + 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if route == "hang":
            FakeJudge.release.wait(10)
            return self._send(200, {"choices": [{"message": {"content": "CORRECT"}}]})
        if route == "denied":
            return self._send(401, {"error": "bad key"})
        if route == "flaky" and FakeJudge.hits[route] <= 2:
            return self._send(503, {"error": "overloaded"})
        user = body["messages"][-1]["content"]
        truth = re.search(r"Ground truth: (.*)", user).group(1).strip()
        answer = re.findall(r"<answer>(.*?)</answer>", user, re.DOTALL)
        given = re.sub(r"^Final Answer:\s*", "", answer[-1].strip()) if answer else ""
        ok = given == truth or (truth.startswith("(") and given in (truth[1], truth[4:]))
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant",
                                                              "content": "CORRECT" if ok else "INCORRECT"}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_server():
    FakeJudge.hits = {}
    FakeJudge.release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    FakeJudge.release.set()
    server.shutdown()
    server.server_close()


def test_judge_parsing_pure():
    assert parse_verdict("CORRECT") is True and parse_verdict("Incorrect.") is False
    assert parse_verdict("The final answer is not correct") is False
    assert parse_verdict("Reasoning... so: **Correct**") is True and parse_verdict("") is None
    assert parse_verdict("I cannot tell") is None
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError, match="must start with http"):
        chat_completions_url("localhost:8000/v1")
    msgs = judge_messages(samples("mathvista")["1"], "<answer>A</answer>")
    assert "Ground truth: (A) 145°" in msgs[1]["content"] and "(D) 125°" in msgs[1]["content"]


def test_judge_against_a_local_http_server(judge_server):
    sample = samples("mathvista")["1"]
    ok = JudgeClient(judge_server + "/ok/v1", "fake", timeout_s=5, retries=0)
    assert [r.verdict for r in ok.judge_many([(sample, "<answer>145°</answer>"), (sample, "<answer>B</answer>"),
                                               (sample, "<answer>A</answer>")], workers=2)] == [True, False, True]
    flaky = JudgeClient(judge_server + "/flaky/v1", "fake", timeout_s=5, retries=3, backoff_s=0.01).judge(
        sample, "<answer>A</answer>")
    assert (flaky.status, flaky.verdict, flaky.attempts, FakeJudge.hits["flaky"]) == ("ok", True, 3, 3)
    t0 = time.perf_counter()
    hung = JudgeClient(judge_server + "/hang/v1", "fake", timeout_s=0.3, retries=1, backoff_s=0.01).judge(
        sample, "<answer>A</answer>")
    assert time.perf_counter() - t0 < 3
    assert (hung.status, hung.verdict, hung.attempts, FakeJudge.hits["hang"]) == ("failed", None, 2, 2)
    assert "timed out after 0.3 s" in hung.error
    denied = JudgeClient(judge_server + "/denied/v1", "fake", timeout_s=5, retries=3, backoff_s=0.01).judge(
        sample, "x")
    assert denied.status == "failed" and "HTTP 401" in denied.error and FakeJudge.hits["denied"] == 1


# ----------------------------------------------------------------------------- the shared OpenAI-compatible client


class ScriptedEndpoint(BaseHTTPRequestHandler):
    """Answers each request with the next (status, body, headers) of `script`; "hang" sleeps past
    the client's timeout. Records the paths it was asked for."""

    script: list = []
    paths: list = []

    def log_message(self, *args):
        pass

    def _reply(self):
        ScriptedEndpoint.paths.append(self.path)
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        status, body, headers = ScriptedEndpoint.script.pop(0) if ScriptedEndpoint.script else (200, {}, {})
        if status == "hang":
            time.sleep(1.0)
            status = 200
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first
            pass

    do_GET = do_POST = _reply


@pytest.fixture
def endpoint():
    ScriptedEndpoint.script, ScriptedEndpoint.paths = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedEndpoint)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _client(url, **kw):
    from megatron_vr1.openai_client import OpenAIClient

    slept: list[float] = []
    kw = {"timeout_s": 5, "max_retries": 3, "backoff_s": 0.01, "jitter": 0.0, "sleep": slept.append, **kw}
    return OpenAIClient(url, **kw), slept


OK_REPLY = {"choices": [{"index": 0, "message": {"content": "hi"}}]}


def test_openai_client_retries_429_5xx_and_bad_replies_with_exponential_backoff(endpoint):
    from megatron_vr1.openai_client import BadReply

    client, slept = _client(endpoint + "/chat/completions/", max_backoff_s=0.03)  # a full URL is cut to its base
    ScriptedEndpoint.script = [(429, {"error": "slow down"}, {}), (503, {}, {}), (200, b"<html>", {}),
                               (200, OK_REPLY, {})]
    reply = client.chat_completions({"model": "m"}, parse=lambda d: d["choices"][0]["message"]["content"])
    assert (reply.data, reply.attempts) == ("hi", 4)
    assert slept == pytest.approx([0.01, 0.02, 0.03])  # 0.01 * 2**k, capped at max_backoff_s
    assert ScriptedEndpoint.paths == ["/v1/chat/completions"] * 4
    # a reply of the wrong shape (parse raises) is retried too, then fails naming the URL
    ScriptedEndpoint.script = [(200, {"choices": []}, {})] * 2

    def parse(d):
        if not d["choices"]:
            raise BadReply("no choices")

    client, slept = _client(endpoint, max_retries=1)
    with pytest.raises(Exception) as info:
        client.chat_completions({}, parse=parse)
    assert f"POST {endpoint}/chat/completions failed after 2 attempts" in str(info.value)
    assert "no choices" in str(info.value) and info.value.attempts == 2 and slept == [0.01]
    # Retry-After (seconds) is honoured, up to the cap
    client, slept = _client(endpoint, max_backoff_s=5)
    ScriptedEndpoint.script = [(429, {}, {"Retry-After": "2"}), (200, {"data": [{"id": "a"}, {"id": "b"}]}, {})]
    assert client.model_ids() == ["a", "b"] and slept == [2.0]
    # jitter only lengthens a delay, by less than its share
    jittery, _ = _client(endpoint, backoff_s=1.0, jitter=0.5, max_backoff_s=60)
    assert all(4.0 <= jittery.backoff(3) < 6.0 for _ in range(20))


def test_openai_client_fails_at_once_on_other_4xx_and_names_the_url(endpoint):
    from megatron_vr1.openai_client import EndpointError

    client, slept = _client(endpoint, api_key="k")
    ScriptedEndpoint.script = [(401, {"error": "bad key"}, {})]
    with pytest.raises(EndpointError) as info:
        client.chat_completions({})
    e = info.value
    assert (e.status, e.attempts, slept, len(ScriptedEndpoint.paths)) == (401, 1, [], 1)
    assert str(e).startswith(f"POST {endpoint}/chat/completions failed: HTTP 401") and "bad key" in str(e)
    assert "not retried" in str(e)
    with pytest.raises(ValueError, match="must start with http"):
        _client("127.0.0.1:8000/v1")


def test_openai_client_retries_timeouts_and_connection_errors(endpoint):
    from megatron_vr1.openai_client import EndpointError

    client, slept = _client(endpoint, timeout_s=0.2, max_retries=1)
    ScriptedEndpoint.script = [("hang", OK_REPLY, {}), (200, OK_REPLY, {})]
    assert client.chat_completions({}).attempts == 2 and slept == [0.01]
    ScriptedEndpoint.script = [("hang", OK_REPLY, {})] * 2
    with pytest.raises(EndpointError, match=r"failed after 2 attempts: timed out after 0.2 s"):
        client.chat_completions({})
    # nothing listens on this port: a connection error, retried, and the message names the URL
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    client, slept = _client(dead, max_retries=2)
    with pytest.raises(EndpointError) as info:
        client.model_ids()
    assert str(info.value).startswith(f"GET {dead}/models failed after 3 attempts: connection error")
    assert slept == [0.01, 0.02] and info.value.status is None


# ----------------------------------------------------------------------------- CLI: re-scoring with known results


def ans(text: str) -> str:
    return f"<think>reasoning</think><answer>{text}</answer>"


RESPONSES = {  # id -> (final response, first response or None when the first one already had </answer>)
    "mathvista": {"1": (ans("Final Answer: A"), "I think the angle is"), "2": (ans("12 cm"), None),
                  "3": (ans("1.52"), None), "4": (ans("[2, 3, 4]"), "[2, 3, 5] so")},
    "mathverse": {"1": (ans("60°"), None), "2": (ans("B"), None), "3": (ans("1.5"), None),
                  "4": (ans("\\sqrt{12}"), None), "5": (ans("6"), None)},
    "mmmath": {"0": (ans("0.33"), None), "1": (ans("3.46"), None), "2": (ans("60"), None), "3": (ans("3, 2"), None),
               "4": (ans("24.9"), None)},
    "mathvision": {"1": (ans("4"), None), "2": ("The side is 48/4.\nFinal Answer: 12", None), "3": (ans("C"), None)},
    "dynamath": {"1-v1": (ans("2.094"), None), "2-v1": (ans("no"), None), "3-v1": (ans("may"), None),
                 "1-v2": (ans("6.28"), None), "2-v2": (ans("(A) yes"), None), "3-v2": (ans("June."), None)},
}


def write_responses(folder: Path) -> None:
    folder.mkdir(parents=True)
    for bench, rows in RESPONSES.items():
        with open(folder / f"{bench}.jsonl", "w") as f:
            for i, (final, first) in rows.items():
                f.write(json.dumps({"id": i, "response": final, "response_tokens": len(final),
                                    "first_response": first or final, "attempts": 2 if first else 1,
                                    "first_response_tokens": len(first or final)}) + "\n")


def test_cli_rescore_known_results_with_judge(tmp_path, judge_server, capsys):
    write_responses(tmp_path / "given")
    out = tmp_path / "out"
    rc = cli.main(["eval", "--responses", str(tmp_path / "given"), "--bench", ALL, "--data", str(FIXTURES),
                   "--out", str(out), "--judge-url", judge_server + "/ok/v1", "--judge-model", "fake",
                   "--judge-workers", "3"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    by = {s["bench"]: s for s in summary["benchmarks"]}
    acc = {b: (round(s["accuracy"], 1), round(s["accuracy_no_retry"], 1), s["n"]) for b, s in by.items()}
    assert acc == {"mathvista": (75.0, 50.0, 4), "mathverse": (80.0, 80.0, 5), "mmmath": (80.0, 80.0, 5),
                   "mathvision": (66.7, 66.7, 3), "dynamath": (83.3, 83.3, 6)}
    assert by["mathvista"]["retried"] == 2 and by["mathvista"]["categories"]["task"]["GPS"]["accuracy"] == 100.0
    assert by["mathvista"]["categories"]["skill"]["ARI"] == {"n": 2, "accuracy": 50.0, "accuracy_no_retry": 50.0}
    assert by["mathverse"]["categories"]["version"]["Vision Only"]["accuracy"] == 100.0
    assert by["mmmath"]["categories"]["difficulty"]["easy"]["accuracy"] == pytest.approx(200 / 3)
    assert (by["dynamath"]["seeds"], round(by["dynamath"]["worst_case_accuracy"], 1)) == (3, 66.7)
    # the judge is a real HTTP round trip: it agrees with the rules where the text is literally the truth
    assert {b: round(s["judge"]["accuracy"], 1) for b, s in by.items()} == {
        "mathvista": 25.0, "mathverse": 40.0, "mmmath": 0.0, "mathvision": 33.3, "dynamath": 33.3}
    assert all(s["judge"]["failed"] == 0 for s in by.values())
    records = [json.loads(x) for x in (out / "mathvista.jsonl").read_text().splitlines()]
    assert [(r["id"], r["correct"], r["correct_no_retry"], r["extracted"], r["rule"]) for r in records] == [
        ("1", True, False, "A", "letter"), ("2", True, True, "12 cm", "integer"),
        ("3", True, True, "1.52", "rounded"), ("4", False, False, "[2, 3, 4]", "list")]
    vision = [json.loads(x) for x in (out / "mathvision.jsonl").read_text().splitlines()]
    assert vision[1]["extracted_by"] == "final_answer" and vision[1]["correct"]
    md = (out / "results.md").read_text()
    assert "| mathvista | 4 | 75.0 | 50.0 | 25.0 | 0 |" in md
    assert "| mathverse (Vision Only) | 1 | 100.0 | 100.0 |" in md
    assert "## mmmath by difficulty" in md and "| dynamath worst case (3 seeds) | 3 | 66.7 |" in md
    assert sorted(p.name for p in out.iterdir()) == [f"{b}.jsonl" for b in sorted(BENCHMARKS)] + [
        "results.md", "summary.json"]  # no temporary files left behind
    # the paper's numbers, for the size asked for
    rc = cli.main(["eval", "--responses", str(tmp_path / "given"), "--bench", "mathvista,mmmath", "--data",
                   str(FIXTURES), "--out", str(tmp_path / "out7"), "--paper-size", "7B"])
    md7 = (tmp_path / "out7" / "results.md").read_text()
    assert rc == 0 and "Qwen2.5-VL-7B (paper) | Vision-R1-7B (paper)" in md7
    assert "| mathvista | 4 | 75.0 | 50.0 | 68.1 | 73.5 |" in md7
    assert "| mmmath | 5 | 80.0 | 80.0 | 34.1 | 40.2 |" in md7


# ----------------------------------------------------------------------------- bad input


def copy_fixtures(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    return data


def run_cli(args, capsys) -> tuple[int, str]:
    rc = cli.main(["eval", *args])
    return rc, capsys.readouterr().err


def test_bad_input_fails_before_the_model_loads(tmp_path, tiny_hf, capsys):
    vllm_before = "vllm" in sys.modules
    base = ["--model", str(tiny_hf), "--out", str(tmp_path / "out")]
    rc, err = run_cli([*base, "--bench", "mathvista,mathqa", "--data", str(FIXTURES)], capsys)
    assert rc == 2 and "unknown benchmark 'mathqa'; choose from mathvista, mathverse, mmmath" in err
    rc, err = run_cli([*base, "--bench", "mathvista", "--data", str(tmp_path)], capsys)
    assert rc == 2 and "no MathVista testmini data in" in err and "--file mathvista=PATH" in err
    rc, err = run_cli([*base, "--bench", "mmmath", "--data", str(FIXTURES), "--file", "mmmath=/nope.jsonl"], capsys)
    assert rc == 2 and "mmmath data file /nope.jsonl does not exist" in err
    rc, err = run_cli(["--model", str(tmp_path), "--bench", "mmmath", "--data", str(FIXTURES)], capsys)
    assert rc == 2 and "neither an HF folder" in err

    data = copy_fixtures(tmp_path)
    vista = json.loads((data / "mathvista/testmini.json").read_text())
    vista["3"]["answer"] = ""
    vista["1"]["answer"] = "150°"  # not one of the choices
    (data / "mathvista/testmini.json").write_text(json.dumps(vista))
    rc, err = run_cli([*base, "--bench", "mathvista", "--data", str(data)], capsys)
    assert rc == 2 and "testmini.json: row '1': answer '150°' is not one of the choices" in err
    assert "--skip-bad-rows" in err
    loaded = load_benchmark("mathvista", data, skip_bad_rows=True)
    assert [s.id for s in loaded.samples] == ["2", "4"]
    assert loaded.skipped == {"answer_not_a_choice": 1, "missing_answer": 1}

    (data / "mathvision/images/2.png").unlink()
    rc, err = run_cli([*base, "--bench", "mathvision", "--data", str(data)], capsys)
    assert rc == 2 and "row '1': image 'images/2.png' not found" in err
    (data / "mathvision/images/2.png").write_bytes(b"not a png")
    rc, err = run_cli([*base, "--bench", "mathvision", "--data", str(data)], capsys)
    assert rc == 2 and "UnidentifiedImageError" in err
    (data / "mmmath/MM_Math.jsonl").write_text('{"question": "q", "file_name": "1.png"}\n{oops\n')
    rc, err = run_cli([*base, "--bench", "mmmath", "--data", str(data)], capsys)
    assert rc == 2 and "MM_Math.jsonl: line 2 is not JSON" in err
    rc, err = run_cli([*base, "--bench", "mathverse", "--data", str(FIXTURES), "--judge-url", "h:1"], capsys)
    assert rc == 2 and "the judge needs both --judge-url and --judge-model" in err
    assert ("vllm" in sys.modules) == vllm_before  # nothing above got as far as the engine


# ----------------------------------------------------------------------------- the tiny model end to end


def test_tiny_model_end_to_end_from_a_megatron_checkpoint(tmp_path, tiny_mcore):
    """`megatron-vr1 eval` on a Megatron checkpoint (exported to HF first) with the real vLLM engine."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/megatron-vr1"), "eval", "--model", str(tiny_mcore), "--bench", ALL,
         "--data", str(FIXTURES), "--out", str(out), "--max-new-tokens", "12", "--max-model-len", str(MAX_LEN),
         "--kv-cache-gib", "0.0625", "--retries", "1", "--seed", "3"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    by = {s["bench"]: s for s in summary["benchmarks"]}
    assert {b: s["n"] for b, s in by.items()} == {"mathvista": 4, "mathverse": 5, "mmmath": 5, "mathvision": 3,
                                                 "dynamath": 6}
    assert summary["settings"]["temperature"] == 0.6 and summary["settings"]["top_p"] == 0.95
    assert summary["model_size"] is None and summary["paper"] == {}
    from megatron_vr1.eval.runner import Generation, prompt_tokens, sample_prompt, score_records
    from megatron_vr1.hf_processor import load_processor

    processor = load_processor(tiny_mcore / "hf")
    too_long = 0
    for bench, s in by.items():
        records = [json.loads(x) for x in (out / f"{bench}.jsonl").read_text().splitlines()]
        assert len(records) == s["n"]
        loaded = load_benchmark(bench, FIXTURES)
        for x, r in zip(loaded.samples, records):
            estimate = prompt_tokens(sample_prompt(x, processor, None), processor)
            if r["finish_reason"] == "prompt_too_long":  # not sent to the engine
                assert estimate >= MAX_LEN and r["response_tokens"] == 0 and not r["correct"]
                too_long += 1
                continue
            # the engine's own prompt length (image tokens expanded) is what the pre-check computed
            assert r["prompt_tokens"] == estimate < MAX_LEN
            assert 1 <= r["response_tokens"] <= min(12, MAX_LEN - estimate)
            assert 1 <= r["first_response_tokens"] <= 12
            # retried exactly when the first response had no </answer>
            assert r["attempts"] == (1 if "</answer>" in r["first_response"] else 2)
            assert r["finish_reason"] in ("stop", "length")
        assert s["prompt_too_long"] == sum(r["finish_reason"] == "prompt_too_long" for r in records)
        lengths = [r["response_tokens"] for r in records if r["finish_reason"] != "prompt_too_long"]
        assert s["length"]["max"] == max(lengths) and s["length"]["mean"] == pytest.approx(sum(lengths) / len(lengths))
        assert s["retried"] == sum(r["attempts"] == 2 for r in records)
        # the recorded verdicts are the rules applied to the recorded responses
        again = score_records(loaded, [Generation(r["response"], r["response_tokens"], r["finish_reason"],
                                                  r["attempts"], r["first_response"], r["first_response_tokens"])
                                       for r in records])
        assert [(a["correct"], a["correct_no_retry"]) for a in again] == [
            (r["correct"], r["correct_no_retry"]) for r in records]
        assert s["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in records) / len(records))
    assert 0 < too_long < sum(s["n"] for s in by.values())  # MathVista's long hints do not fit 200 tokens
    md = (out / "results.md").read_text()
    assert "No published numbers for this model size (hidden 128, 4 layers)" in md
    assert "| mathverse (Vision Only) | 1 |" in md
    print(f"end to end: {seconds:.1f} s, lengths {[by[b]['length'] for b in by]}")
