"""Typed run configuration: one YAML file per recipe -> nested dataclasses, validated.

- Every field has a one-line docstring (the string literal on the line after it). `field_docs()`
  reads them and `Config.to_yaml()` writes them as comments, so the resolved YAML printed by
  `megatron-vr1 config RECIPE` (or any command's `--dry-run`) is also the reference.
- Loading is strict: an unknown key is an error naming the key, its section and close matches;
  a wrong type is an error naming the key, the expected type and the value.
- Simple rules on one field live in each section's `__post_init__`; rules across sections in
  `Config.__post_init__`; rules that need the model architecture in `Config.validate_against`.
  The world size is not known here: `ParallelConfig.dp(world_size)` checks it at launch.
- The architecture is never restated in YAML: `load_hf_arch(model.hf_path)` reads the HF
  checkpoint's config.json.
- Overrides: `load_config(path, ["optim.lr=1e-5", "ptst.stages[0].steps=5"])`; each value is
  parsed as YAML (`ptst.stages=[{max_response_length: 64, group_size: 8}]` works too).
- Relative paths: a path written in a YAML file is relative to that file's folder; a path given
  as a command-line override is relative to the current directory. After loading, every path is
  absolute, so the resolved config saved in the run folder is valid from anywhere.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import json
import math
import os
import re
import tempfile
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelConfig:
    hf_path: Path
    """Hugging Face Qwen2.5-VL checkpoint folder (config.json, weights, tokenizer, processor)."""
    mcore_path: Path | None = None
    """Megatron checkpoint to start from (convert hf-to-mcore or an SFT run); null: hf_path's weights."""
    freeze_vision: bool = False
    """Freeze the vision tower and its merger (projector); the language model still trains."""
    params_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Dtype of the trained weights and activations (float32 for CPU runs and parity tests)."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """Transformer Engine FP8 format for the language model's linear layers; null: no FP8."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """Transformer Engine FP8 scaling recipe (used only when fp8 is set)."""

    def __post_init__(self):
        _check_fields(self, "model")


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size; must divide the attention heads, KV heads and FFN size."""
    pp: int = 1
    """Pipeline-parallel size; must divide the layers. Data-parallel size = world size / (tp*pp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism over the tensor-parallel group (needs tp > 1)."""
    micro_batch_size: int = 1
    """Rows per micro-batch in the training forward/backward passes (RL: when max_tokens_per_microbatch is 0)."""
    max_tokens_per_microbatch: int = 0
    """RL: as many rows per micro-batch as fit this many tokens (rows x the step's longest rollout);
    0: micro_batch_size rows. Fewer, larger micro-batches cost less per-micro-batch overhead."""
    rl_packing: bool = True
    """RL: pack several rollouts into one row (block-diagonal attention, each rollout's own mRoPE
    positions) instead of one right-padded rollout per row. Ignored (one per row) under Transformer
    Engine's fused attention, which honours only the causal mask."""
    rl_share_prompts: bool = True
    """RL, packed rows: the rollouts of one prompt share one copy of the prompt (its tokens and
    images are computed once per group, not once per rollout; each response sees the prompt and
    itself only). Same logprobs and gradients as unshared rows, ~G-fold less prompt work."""
    recompute: bool = False
    """Recompute every transformer layer's activations in the backward pass (less memory, ~1/3 more compute)."""

    def __post_init__(self):
        _check_fields(self, "parallel")
        _at_least(self, "parallel", "tp", 1)
        _at_least(self, "parallel", "pp", 1)
        _at_least(self, "parallel", "micro_batch_size", 1)
        _at_least(self, "parallel", "max_tokens_per_microbatch", 0)
        if self.sequence_parallel and self.tp == 1:
            raise ValueError(
                "parallel.sequence_parallel (True) needs parallel.tp > 1 (tp is 1); "
                "set parallel.sequence_parallel=false or raise parallel.tp"
            )

    def dp(self, world_size: int) -> int:
        """Data-parallel size for `world_size` processes."""
        if world_size % (self.tp * self.pp):
            raise ValueError(
                f"parallel.tp*parallel.pp ({self.tp}*{self.pp}={self.tp * self.pp}) must divide "
                f"the world size ({world_size}); change tp/pp or the number of processes"
            )
        return world_size // (self.tp * self.pp)


R1_ZERO_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>."
)
"""DeepSeek-R1-Zero's prompt, used as the system prompt by Vision-R1-Zero (RL from the base model).
Vision-R1's PTST uses none (`data.system_prompt: null`)."""

SYSTEM_PROMPTS = {"r1-zero": R1_ZERO_SYSTEM_PROMPT}
"""Named system prompts: `data.system_prompt: r1-zero` (or eval's --system-prompt r1-zero)."""


@dataclass(kw_only=True)
class DataConfig:
    train_path: Path | None = None
    """RL rows: a parquet file with images, problem and answer columns (geometry3k schema)."""
    val_path: Path | None = None
    """Held-out RL rows (same schema) for validation accuracy; null: no validation."""
    max_prompt_length: int = 4096
    """Longest prompt in tokens, image tokens included; longer rows are counted and skipped."""
    min_pixels: int = 3136
    """Images with fewer pixels are upscaled (processor min_pixels, 4*28*28)."""
    max_pixels: int = 1003520
    """Images with more pixels are downscaled (processor max_pixels, 1280*28*28)."""
    system_prompt: str | None = None
    """System prompt of RL prompts: null (the chat template's default; Vision-R1 PTST), a name in
    SYSTEM_PROMPTS (r1-zero: Vision-R1-Zero), or the text itself."""

    def __post_init__(self):
        _check_fields(self, "data")
        self.system_prompt = SYSTEM_PROMPTS.get(self.system_prompt, self.system_prompt)
        _at_least(self, "data", "max_prompt_length", 1)
        _at_least(self, "data", "min_pixels", 1)
        if self.max_pixels < self.min_pixels:
            raise ValueError(
                f"data.max_pixels ({self.max_pixels}) must be >= data.min_pixels "
                f"({self.min_pixels}); raise max_pixels or lower min_pixels"
            )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate of AdamW (a PTST stage may override it)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Schedule after warmup; cosine decays to 0 over the run (SFT: optimizer steps; RL: the RL steps of all enabled stages)."""
    warmup_ratio: float = 0.0
    """Fraction of the run (SFT: optimizer steps; RL: RL steps of all enabled stages) with linear warmup from 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self):
        _check_fields(self, "optim")
        _positive(self, "optim", "lr")
        _positive(self, "optim", "eps")
        _at_least(self, "optim", "weight_decay", 0)
        _at_least(self, "optim", "grad_clip", 0)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio ({self.warmup_ratio}) must be in [0, 1)")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ValueError(f"optim.betas[{i}] ({beta}) must be in [0, 1), e.g. [0.9, 0.999]")


@dataclass(kw_only=True)
class GRPOConfig:
    reward: Literal["hfrrf", "format_and_result"] = "hfrrf"
    """hfrrf: 1 only if format and answer are right (Vision-R1); format_and_result: 1:1 (Zero)."""
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    """grpo: (r - group mean) / (group std + adv_eps); drgrpo: r - group mean (Dr. GRPO)."""
    adv_eps: float = 1e-6
    """Added to the group std in the grpo advantage."""
    clip_low: float = 0.2
    """PPO clip below 1: the ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.2
    """PPO clip above 1: the ratio is clipped at 1 + clip_high (> clip_low is clip-higher)."""
    kl_beta: float = 1e-2
    """Weight of the KL(policy || reference) loss term; 0 skips the reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL(pi || ref) estimator with r = ref/pi: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - log r - 1."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts entropy_coef x the mean token entropy (logged either way)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """Mean over all tokens of the global batch, or over tokens per sequence then over sequences."""
    minibatch_prompts: int = 128
    """Prompts (each with its group of responses) per optimizer step."""
    epochs_per_rollout: int = 1
    """Passes over each rollout batch."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token by min(exp(old - engine logp), cap); null: off."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (zero advantage) and refill the step by sampling more prompts (DAPO)."""
    max_resample_rounds: int = 3
    """Dynamic sampling: at most this many extra rollout rounds per step; the step then trains on what it has."""
    overlong_buffer: int = 0
    """Soft overlong punishment (DAPO): a response longer than max_response_length - overlong_buffer tokens
    loses reward linearly, down to -overlong_penalty at the cap; 0: off."""
    overlong_penalty: float = 1.0
    """Reward lost by a response that reaches the length cap when overlong_buffer > 0."""
    mask_truncated: bool = False
    """Truncated responses (hit the length cap) get no loss at all instead of their (zero) reward's advantage."""

    def __post_init__(self):
        _check_fields(self, "grpo")
        _positive(self, "grpo", "adv_eps")
        _positive(self, "grpo", "clip_low")
        _positive(self, "grpo", "clip_high")
        if self.clip_low >= 1:
            raise ValueError(f"grpo.clip_low ({self.clip_low}) must be < 1, e.g. 0.2")
        _at_least(self, "grpo", "kl_beta", 0)
        _at_least(self, "grpo", "entropy_coef", 0)
        _at_least(self, "grpo", "minibatch_prompts", 1)
        _at_least(self, "grpo", "epochs_per_rollout", 1)
        _at_least(self, "grpo", "max_resample_rounds", 0)
        _at_least(self, "grpo", "overlong_buffer", 0)
        _at_least(self, "grpo", "overlong_penalty", 0)
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ValueError(f"grpo.tis_cap ({self.tis_cap}) must be >= 1 (or null to turn it off)")


@dataclass(kw_only=True)
class PTSTStage:
    max_response_length: int
    """Length cap of a response in tokens; a truncated response has no </answer> and scores 0."""
    group_size: int
    """Responses sampled per prompt (G) for the group-relative advantage."""
    steps: int = 100
    """RL steps (rollout batches) in this stage."""
    enabled: bool = True
    """false: skip this stage (Vision-R1's 16K stage is optional)."""
    lr: float | None = None
    """Learning rate in this stage; null: optim.lr."""

    def __post_init__(self):
        _check_fields(self, "ptst.stages[]")


@dataclass(kw_only=True)
class PTSTConfig:
    stages: list[PTSTStage] = field(
        default_factory=lambda: [
            PTSTStage(max_response_length=4096, group_size=16),
            PTSTStage(max_response_length=8192, group_size=8),
            PTSTStage(max_response_length=16384, group_size=4, enabled=False),
        ]
    )
    """Stages in order; Vision-R1 raises the cap and lowers G: 4K/16 -> 8K/8 -> optional 16K/4."""

    def __post_init__(self):
        if not self.stages:
            raise ValueError(
                "ptst.stages is empty; give at least one stage, e.g. "
                "ptst.stages=[{max_response_length: 4096, group_size: 16, steps: 100}]"
            )
        for i, stage in enumerate(self.stages):
            key = f"ptst.stages[{i}]"
            if stage.max_response_length < 1:
                raise ValueError(f"{key}.max_response_length ({stage.max_response_length}) must be >= 1")
            if stage.group_size < 2:
                raise ValueError(
                    f"{key}.group_size ({stage.group_size}) must be >= 2: a group-relative "
                    "advantage needs at least two responses per prompt"
                )
            if stage.steps < 1:
                raise ValueError(
                    f"{key}.steps ({stage.steps}) must be >= 1; set {key}.enabled=false to skip it"
                )
            if stage.lr is not None and stage.lr <= 0:
                raise ValueError(f"{key}.lr ({stage.lr}) must be > 0, or null to use optim.lr")
        if not any(stage.enabled for stage in self.stages):
            raise ValueError(
                f"ptst.stages has {len(self.stages)} stage(s) but none is enabled; "
                "set ptst.stages[0].enabled=true"
            )


@dataclass(kw_only=True)
class RolloutConfig:
    prompts_per_step: int = 512
    """Prompts per RL step; each gets group_size responses; a multiple of grpo.minibatch_prompts."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 samples from the full distribution."""
    gpu_memory_utilization: float = 0.6
    """vLLM on GPU: fraction of GPU memory for its weights and KV cache while rolling out."""
    kv_cache_gib: float | None = None
    """vLLM KV-cache size in GiB; null: derived from gpu_memory_utilization (GPU). Set it on CPU."""
    tensor_parallel_size: int | None = None
    """Tensor parallelism of each rollout engine replica (world size / this = replicas); null: parallel.tp."""
    compile: bool = True
    """vLLM runs its torch.compile'd model (on GPU also CUDA graphs, vLLM's default); false: eager,
    which starts faster (CPU, tiny model: ~5 s instead of ~10 s with a warm compile cache, ~18 s
    cold) and generates slower (~1.6x the rollout time there)."""

    def __post_init__(self):
        _check_fields(self, "rollout")
        _at_least(self, "rollout", "prompts_per_step", 1)
        _positive(self, "rollout", "temperature")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p ({self.top_p}) must be in (0, 1], e.g. 1.0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.gpu_memory_utilization ({self.gpu_memory_utilization}) must be in (0, 1], e.g. 0.6"
            )
        if self.kv_cache_gib is not None:
            _positive(self, "rollout", "kv_cache_gib")
        if self.tensor_parallel_size is not None:
            _at_least(self, "rollout", "tensor_parallel_size", 1)


@dataclass(kw_only=True)
class SFTConfig:
    data_path: Path | None = None
    """Cold-start rows: JSON/JSONL in LLaVA-CoT, Mulberry or messages format."""
    image_root: Path | None = None
    """Folder that relative image paths in the rows refer to; null: the data file's folder."""
    epochs: int = 2
    """Passes over the SFT data."""
    global_batch_size: int = 32
    """Sequences per optimizer step, over all data-parallel ranks."""
    max_length: int = 16384
    """Sequence cutoff in tokens (prompt + response, image tokens included)."""

    def __post_init__(self):
        _check_fields(self, "sft")
        _at_least(self, "sft", "epochs", 1)
        _at_least(self, "sft", "global_batch_size", 1)
        _at_least(self, "sft", "max_length", 1)


@dataclass(kw_only=True)
class CheckpointConfig:
    save_interval: int = 50
    """Save every this many steps, and always at the end of each PTST stage and of the run."""
    keep_last: int = 0
    """Keep the newest this many periodic step checkpoints (RL and SFT); stage ends, `best`, `sft_final`
    and the one `latest` names are never deleted. 0 keeps all."""

    def __post_init__(self):
        _check_fields(self, "checkpoint")
        _at_least(self, "checkpoint", "save_interval", 1)
        _at_least(self, "checkpoint", "keep_last", 0)


@dataclass(kw_only=True)
class LoggingConfig:
    log_interval: int = 1
    """Write metrics (TensorBoard and metrics.jsonl always, W&B if set) every this many steps, RL and SFT
    alike, and at the last step of each stage/run; the console progress line prints every step."""
    val_interval: int = 0
    """Every this many RL steps, greedy accuracy on data.val_path; 0: never."""
    wandb_project: str | None = None
    """Weights & Biases project; null: no W&B."""
    wandb_mode: Literal["online", "offline"] = "online"
    """W&B mode; offline on nodes without network (sync later with `wandb sync`)."""
    profile_step: int = 0
    """RL: run this global step under torch.profiler and write <run_dir>/profile_step<N>.txt (the
    top operators by self time, rank 0) and a Chrome trace next to it; 0: never."""

    def __post_init__(self):
        _check_fields(self, "logging")
        _at_least(self, "logging", "log_interval", 1)
        _at_least(self, "logging", "val_interval", 0)
        _at_least(self, "logging", "profile_step", 0)


@dataclass(kw_only=True)
class SlurmConfig:
    partition: str | None = None
    """Slurm partition (sbatch --partition); null: the cluster's default partition."""
    account: str | None = None
    """Slurm account (sbatch --account); null: the user's default account."""
    qos: str | None = None
    """Slurm quality of service (sbatch --qos); null: the default."""
    nodes: int = 8
    """Nodes per training job (64 H800 GPUs in Vision-R1: 8 nodes x 8)."""
    gpus_per_node: int = 8
    """GPUs per node, one trainer process each (sbatch --gpus-per-node); 0 on a CPU partition."""
    procs_per_node: int = 0
    """Trainer processes per node (torchrun --nproc-per-node); 0: gpus_per_node."""
    cpus_per_node: int = 0
    """CPUs per node (srun --cpus-per-task of the one torchrun task); 0: the whole node (--exclusive)."""
    mem: str = "0"
    """Memory per node (sbatch --mem, e.g. 500G); "0": all of the node's memory."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB, for `megatron-vr1 plan` (H800/H100: 80)."""
    time_limit: str = "24:00:00"
    """Time limit of each job (sbatch --time); a stage that needs longer is requeued and resumes."""
    signal_seconds: int = 600
    """Ask for SIGUSR1 this many seconds before the time limit: save, requeue, resume."""
    max_requeues: int = 20
    """A job stops requeueing itself after this many restarts (SLURM_RESTART_COUNT)."""
    container_image: str | None = None
    """pyxis/enroot image (srun --container-image, e.g. nvcr.io#nvidia/pytorch:25.01-py3); null: none."""
    container_mounts: str | None = None
    """pyxis mounts (srun --container-mounts, e.g. /lustre:/lustre); null: none."""

    def __post_init__(self):
        _check_fields(self, "slurm")
        _at_least(self, "slurm", "nodes", 1)
        _at_least(self, "slurm", "gpus_per_node", 0)
        _at_least(self, "slurm", "procs_per_node", 0)
        _at_least(self, "slurm", "cpus_per_node", 0)
        _positive(self, "slurm", "gpu_memory_gib")
        _at_least(self, "slurm", "signal_seconds", 0)
        _at_least(self, "slurm", "max_requeues", 0)
        if self.gpus_per_node == 0 and self.procs_per_node == 0:
            raise ValueError(
                "slurm.gpus_per_node is 0 (a CPU partition): set slurm.procs_per_node to the trainer "
                "processes per node, e.g. slurm.procs_per_node=2"
            )
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time_limit):
            raise ValueError(
                f"slurm.time_limit ({self.time_limit!r}) must be a Slurm time such as 24:00:00, "
                "2-00:00:00 or 90 (minutes)"
            )

    @property
    def procs(self) -> int:
        """Trainer processes per node."""
        return self.procs_per_node or self.gpus_per_node

    @property
    def world_size(self) -> int:
        """Trainer processes per job."""
        return self.nodes * self.procs


_PSEUDO_COT_PROMPT = (
    "Question: {question}\nThe correct answer is: {answer}\n"
    "Look at the image and write a short step-by-step reasoning (chain of thought) that leads from the "
    "image and the question to this answer."
)
_DESCRIPTION_PROMPT = (
    "Question: {question}\nA reasoning about this image: {pseudo_cot}\n"
    "Describe the image in detail: every object, number, label, relation and value that this reasoning "
    "uses, so that someone who cannot see the image could answer the question from your description alone."
)
_REASONING_PROMPT = (
    "An image is described as follows:\n{description}\n\nQuestion: {question}\n{answer_hint}"
    "Think step by step, question your own steps and check them, then give the final answer. Write the "
    "reasoning inside <think> </think> and the final answer alone inside <answer> </answer>."
)
_REWRITES = [
    ("according to the description", "according to the image"),
    ("based on the description", "based on the image"),
    ("from the description", "from the image"),
    ("in the description", "in the image"),
    ("the description says", "the image shows"),
    ("the description states", "the image shows"),
    ("the description mentions", "the image shows"),
    ("the description shows", "the image shows"),
    ("as described", "as shown"),
    ("described in the image", "shown in the image"),
    ("the description", "the image"),
]


@dataclass(kw_only=True)
class ColdStartModelConfig:
    backend: Literal["vllm", "openai"] = "vllm"
    """vllm: offline vLLM on local weights (path); openai: any OpenAI-compatible chat-completions endpoint (url)."""
    path: Path | None = None
    """vllm backend: HF model folder; null: model.hf_path."""
    url: str | None = None
    """openai backend: base URL, e.g. http://127.0.0.1:8000/v1 (requests go to <url>/chat/completions)."""
    model_name: str | None = None
    """openai backend: the requests' model field; null: the first model listed by <url>/models."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai backend: environment variable holding the API key (sent as a Bearer token when set)."""
    max_tokens: int = 4096
    """Longest response in tokens; a response cut at this length is filtered (truncated)."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy (reproducible, so a resumed run equals an uninterrupted one)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    structured_regex: str | None = None
    """Constrain responses to this regex with vLLM structured outputs (vllm backend or a vLLM server); null: free text."""
    concurrency: int = 8
    """openai backend: requests in flight at once (a thread pool)."""
    timeout_s: float = 600.0
    """openai backend: seconds one request may take before it is retried."""
    max_retries: int = 4
    """openai backend: retries of a request (connection error, timeout, 408/409/429/5xx) before the row is failed."""
    backoff_s: float = 1.0
    """openai backend: delay before the first retry; doubles at each retry (capped at 60 s)."""
    max_model_len: int = 8192
    """vllm backend: context length (prompt + response) of the engine."""
    kv_cache_gib: float = 1.0
    """vllm backend on CPU: KV cache size in GiB (on GPU rollout.gpu_memory_utilization applies)."""

    def __post_init__(self):
        _check_fields(self, "coldstart.<model>")
        _at_least(self, "coldstart.<model>", "max_tokens", 1)
        _at_least(self, "coldstart.<model>", "temperature", 0)
        _at_least(self, "coldstart.<model>", "concurrency", 1)
        _at_least(self, "coldstart.<model>", "max_retries", 0)
        _positive(self, "coldstart.<model>", "timeout_s")
        _at_least(self, "coldstart.<model>", "backoff_s", 0)
        _at_least(self, "coldstart.<model>", "max_model_len", 2)
        _positive(self, "coldstart.<model>", "kv_cache_gib")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"coldstart.<model>.top_p ({self.top_p}) must be in (0, 1], e.g. 1.0")
        if self.backend == "openai" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError(
                f"coldstart.<model>.url ({self.url!r}) must be an http(s) base URL for backend openai, "
                "e.g. http://127.0.0.1:8000/v1"
            )
        if self.structured_regex is not None:
            try:
                re.compile(self.structured_regex)
            except re.error as e:
                raise ValueError(f"coldstart.<model>.structured_regex ({self.structured_regex!r}) is not a regex: {e}")


@dataclass(kw_only=True)
class OpenVLThinkerConfig:
    iterations: int = 3
    """SFT -> GRPO rounds; after each round but the last the RL model regenerates the SFT data."""
    sft_recipe: Path | None = None
    """Recipe of each round's SFT step (its run_dir, sft.data_path and model.mcore_path are set per round)."""
    rl_recipe: Path | None = None
    """Recipe of each round's GRPO step (its run_dir and model.mcore_path are set per round)."""
    sft_from: Literal["base", "previous"] = "base"
    """SFT of round i+1 starts from the SFT recipe's model.mcore_path (base) or round i's RL model (previous)."""
    data_path: Path | None = None
    """Rows (RL parquet) the RL model answers to regenerate the SFT data; null: coldstart.input_path."""
    samples: int = 4
    """Responses sampled per row when regenerating (k); the shortest correct one is kept."""
    temperature: float = 1.0
    """Sampling temperature when regenerating."""
    top_p: float = 0.99
    """Nucleus threshold when regenerating (OpenVLThinker: 0.99)."""
    max_tokens: int = 4096
    """Longest regenerated response in tokens."""
    truncate_at: str | None = "Wait,"
    """Cut the reasoning of a kept response before this reflection marker; null: keep it whole."""

    def __post_init__(self):
        _check_fields(self, "coldstart.loop")
        _at_least(self, "coldstart.loop", "iterations", 1)
        _at_least(self, "coldstart.loop", "samples", 1)
        _at_least(self, "coldstart.loop", "temperature", 0)
        _at_least(self, "coldstart.loop", "max_tokens", 1)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"coldstart.loop.top_p ({self.top_p}) must be in (0, 1], e.g. 0.99")
        if self.truncate_at is not None and not self.truncate_at.strip():
            raise ValueError("coldstart.loop.truncate_at is blank; give a marker such as 'Wait,' or null")


@dataclass(kw_only=True)
class ColdStartConfig:
    input_path: Path | None = None
    """Rows to bridge: an RL parquet (images, problem, answer); null: data.train_path."""
    output_dir: Path | None = None
    """Shards, images and the assembled SFT files; null: <run_dir>/coldstart."""
    max_rows: int | None = None
    """Use only the first this many rows of input_path; null: all."""
    num_shards: int = 1
    """Row i goes to shard i % num_shards; `coldstart CONFIG --shard K` runs one shard (one worker each)."""
    chunk_rows: int = 32
    """Rows sent through the three model calls together (also the most rows a crash can lose per worker)."""
    mllm: ColdStartModelConfig = field(default_factory=ColdStartModelConfig)
    """The multimodal model writing the pseudo-CoT and the description (Vision-R1: Qwen2.5-VL-72B)."""
    reasoner: ColdStartModelConfig = field(default_factory=ColdStartModelConfig)
    """The text reasoning model writing the CoT from the description (Vision-R1: DeepSeek-R1)."""
    pseudo_cot_prompt: str = _PSEUDO_COT_PROMPT
    """Step 1 (image + text to the MLLM); fields {question} {answer}; write literal braces as {{ }}."""
    description_prompt: str = _DESCRIPTION_PROMPT
    """Step 2 (image + text to the MLLM); fields {question} {answer} {pseudo_cot}."""
    reasoning_prompt: str = _REASONING_PROMPT
    """Step 3 (text only to the reasoner); fields {question} {description} {answer_hint} {answer}."""
    answer_hint: str = "The correct answer is {answer}; reach it by your own reasoning. "
    """Rendered into {answer_hint} when give_answer is true (field {answer}); else {answer_hint} is empty."""
    give_answer: bool = True
    """Show the reasoner the ground truth (the Vision-R1 authors do)."""
    rewrite_phrases: list[tuple[str, str]] = field(default_factory=lambda: [tuple(r) for r in _REWRITES])
    """[from, to] pairs replaced in the CoT (case-insensitive, longest first) so it reads as if it saw the image."""
    forbidden_phrases: list[str] = field(default_factory=lambda: ["description", "described"])
    """A CoT still holding one of these words after the rewrites is dropped (refers_to_description)."""
    max_repeats: int = 3
    """A CoT repeating one sentence more than this many times is dropped (repetitive)."""
    formats: list[Literal["llava_cot", "mulberry", "messages"]] = field(default_factory=lambda: ["llava_cot", "messages"])
    """Assembled outputs, <output_dir>/coldstart_<format>.jsonl; each is a `megatron-vr1 sft` input."""
    loop: OpenVLThinkerConfig = field(default_factory=OpenVLThinkerConfig)
    """The OpenVLThinker loop (`coldstart CONFIG --loop`): SFT -> GRPO -> regenerate, N rounds."""

    def __post_init__(self):
        _check_fields(self, "coldstart")
        if self.max_rows is not None:
            _at_least(self, "coldstart", "max_rows", 1)
        _at_least(self, "coldstart", "num_shards", 1)
        _at_least(self, "coldstart", "chunk_rows", 1)
        _at_least(self, "coldstart", "max_repeats", 1)
        if not self.formats:
            raise ValueError("coldstart.formats is empty; give at least one of llava_cot, mulberry, messages")
        for name, allowed in (
            ("pseudo_cot_prompt", {"question", "answer"}),
            ("description_prompt", {"question", "answer", "pseudo_cot"}),
            ("reasoning_prompt", {"question", "description", "answer_hint", "answer"}),
            ("answer_hint", {"answer"}),
        ):
            _check_template(f"coldstart.{name}", getattr(self, name), allowed)
        for i, pair in enumerate(self.rewrite_phrases):
            if not pair[0].strip():
                raise ValueError(f"coldstart.rewrite_phrases[{i}] has an empty 'from' phrase; remove the pair")
        for model in ("mllm", "reasoner"):
            m = getattr(self, model)
            if m.backend == "openai" and not m.url:
                raise ValueError(f"coldstart.{model}.url is not set; backend openai needs e.g. http://127.0.0.1:8000/v1")


def _check_template(key: str, text: str, allowed: set[str]) -> None:
    """A str.format template uses only `allowed` fields, without indexing or conversions."""
    import string

    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"{key}: {e} in {_fmt(text)}; write literal braces as {{{{ and }}}}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conv:
            raise ValueError(
                f"{key} uses the field {{{name}}}, which is not one of {sorted(allowed)} "
                f"(fields are {{name}}; write literal braces as {{{{ and }}}})"
            )


@dataclass(kw_only=True)
class Config:
    run_dir: Path | None = None
    """Run folder (checkpoints, logs, config.yaml); resumes from its newest checkpoint. null: ./runs/<recipe>."""
    seed: int = 1234
    """Seed of data order, initialisation and sampling."""
    model: ModelConfig
    """Which checkpoint is trained, and how its weights are held."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """RL data and image preprocessing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule of the command being run (RL or SFT)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO objective and update batching."""
    ptst: PTSTConfig = field(default_factory=PTSTConfig)
    """Progressive thinking suppression training: the RL stages."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of responses with vLLM."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Cold-start supervised fine-tuning."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""
    coldstart: ColdStartConfig = field(default_factory=ColdStartConfig)
    """Cold-start data by modality bridging, and the OpenVLThinker loop (`megatron-vr1 coldstart`)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Cluster resources of `megatron-vr1 slurm submit` and `megatron-vr1 plan`."""

    def __post_init__(self):
        _check_fields(self, "")
        mb, pps = self.grpo.minibatch_prompts, self.rollout.prompts_per_step
        if pps % mb:
            raise ValueError(
                f"rollout.prompts_per_step ({pps}) must be a multiple of grpo.minibatch_prompts "
                f"({mb}): each RL step makes prompts_per_step / minibatch_prompts optimizer steps; "
                f"use rollout.prompts_per_step={max(mb, pps // mb * mb)} or a divisor of {pps} "
                "for grpo.minibatch_prompts"
            )
        mbs = self.parallel.micro_batch_size
        for i, stage in enumerate(self.ptst.stages):
            if stage.enabled and (mb * stage.group_size) % mbs:
                raise ValueError(
                    f"ptst.stages[{i}].group_size ({stage.group_size}): the responses per optimizer "
                    f"step, grpo.minibatch_prompts*group_size ({mb}*{stage.group_size}="
                    f"{mb * stage.group_size}), must be a multiple of parallel.micro_batch_size "
                    f"({mbs}); change one of them"
                )

    def validate_against(self, arch: HFArch, rl: bool = True) -> None:
        """Checks that need the architecture read from model.hf_path (call before building anything).
        `rl=False` (SFT, data generation) skips the PTST stage lengths, which only RL uses."""
        text, where = arch.text, f"model.hf_path={arch.path}"
        tp, pp = self.parallel.tp, self.parallel.pp
        ok_tp = _divisors(math.gcd(text.num_heads, text.num_kv_heads, text.ffn_hidden_size))
        for count, what in (
            (text.num_heads, "attention heads"),
            (text.num_kv_heads, "KV heads"),
            (text.ffn_hidden_size, "FFN hidden size"),
        ):
            if count % tp:
                raise ValueError(
                    f"parallel.tp ({tp}) must divide the number of {what} ({count}) of {where}; "
                    f"use tp in {_fmt_set(ok_tp)}"
                )
        if text.num_layers % pp:
            raise ValueError(
                f"parallel.pp ({pp}) must divide the number of layers ({text.num_layers}) of "
                f"{where}; use pp in {_fmt_set(_divisors(text.num_layers))}"
            )
        if rl:  # the vLLM rollout engine splits the model at its own TP (rollout/layout.py)
            from megatron_vr1.rollout.layout import check_rollout_tp, rollout_tp

            check_rollout_tp(arch, rollout_tp(self), "rollout.tensor_parallel_size" if
                             self.rollout.tensor_parallel_size else "parallel.tp (rollout.tensor_parallel_size: null)")
        for i, stage in enumerate(self.ptst.stages if rl else ()):
            total = self.data.max_prompt_length + stage.max_response_length
            if stage.enabled and total > text.max_position_embeddings:
                raise ValueError(
                    f"ptst.stages[{i}].max_response_length ({stage.max_response_length}) + "
                    f"data.max_prompt_length ({self.data.max_prompt_length}) = {total} exceeds "
                    f"max_position_embeddings ({text.max_position_embeddings}) of {where}; "
                    "lower one of them"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values (paths as strings, tuples as lists)."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, each field followed by its docstring as a comment."""
        lines = ["# megatron-vr1 resolved config: every field, with its meaning after '#'"]
        _emit(self, 0, lines)
        return "\n".join(lines) + "\n"

    def save_resolved(self, run_dir: str | os.PathLike | None = None) -> Path:
        """Atomically writes to_yaml() to <run_dir>/config.yaml (default: self.run_dir)."""
        folder = Path(run_dir if run_dir is not None else self.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "config.yaml"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config.yaml.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_yaml())
            os.replace(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise
        return out


# --------------------------------------------------------------------------------------------
# Architecture from the HF checkpoint: read by `checkpoints_conv.arch` (the converter and the
# model share one definition); re-exported here for the trainer's callers.
# --------------------------------------------------------------------------------------------

from checkpoints_conv.arch import HFArch, TextArch, VisionArch, load_hf_arch  # noqa: E402,F401


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-6 as a float (YAML 1.1 needs a dot: 1.0e-6)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings _Loader would read as floats."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


@dataclass
class _Ctx:
    yaml_dir: Path
    cwd: Path
    overridden: set[str]

    def from_override(self, key: str) -> bool:
        return any(key == o or key.startswith((o + ".", o + "[")) for o in self.overridden)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a recipe strictly, applies `key.sub=value` / `key[i].sub=value` overrides, validates.

    Relative paths in the file resolve against the file's folder, those in overrides against
    the current directory; run_dir defaults to ./runs/<recipe file name without .yaml>.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {path} not found; give the path of a recipe such as configs/tiny_cpu.yaml"
        )
    raw = _merge(_defaults(Config), _read_recipe(path, ()))
    overridden = set()
    for item in overrides:
        overridden.add(_apply_override(raw, item))
    cwd = Path.cwd()
    cfg = _build(Config, raw, "", _Ctx(path.parent.absolute(), cwd, overridden))
    if cfg.run_dir is None:
        cfg.run_dir = cwd / "runs" / path.stem
    return cfg


def _read_recipe(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The recipe's mapping, with `base: other.yaml` resolved: the base recipe's values first,
    then this file's on top (sections merge key by key; lists such as ptst.stages replace).
    A base lives in the same folder, so relative paths mean the same in both files."""
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {_fmt(data)}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or "/" in base or "\\" in base:
        raise ValueError(
            f"{path}: base ({_fmt(base)}) must be the file name of a recipe in the same folder, "
            "e.g. base: qwen25vl_7b_ptst.yaml"
        )
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
        cycle = " -> ".join(p.name for p in (*chain, path, base_path))
        raise ValueError(f"{path}: base recipes form a cycle ({cycle}); remove one base: line")
    if not base_path.is_file():
        raise FileNotFoundError(
            f"{path}: base recipe {base_path} not found; base: names a file in {path.parent}"
        )
    return _merge(_read_recipe(base_path, (*chain, path)), data)


def _defaults(cls) -> dict[str, Any]:
    """Field defaults of a dataclass as plain values (required fields left out)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = _to_plain(f.default)
        elif f.default_factory is not MISSING:
            out[f.name] = _to_plain(f.default_factory())
        elif is_dataclass(_hints(cls)[f.name]):
            out[f.name] = _defaults(_hints(cls)[f.name])
    return out


def _merge(base: Any, new: Any) -> Any:
    if isinstance(base, dict) and new is None:  # a section left empty in YAML
        return base
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for k, v in new.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return new


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*)*")


def _apply_override(raw: dict, item: str) -> str:
    """Sets raw[...] for one `dotted.key[i]=value`; returns the dotted key."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not _KEY.fullmatch(key):
        raise ValueError(
            f"override {item!r} must look like key=value with a dotted key, e.g. optim.lr=1e-5 "
            "or ptst.stages[0].steps=5"
        )
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: the value is not valid YAML: {e}") from None
    steps: list[str | int] = []
    for part in key.split("."):
        name, *idx = part.split("[")
        steps.append(name)
        steps += [int(i.rstrip("]")) for i in idx]
    node: Any = raw
    done = ""
    for step, nxt in zip(steps, steps[1:]):
        node, done = _descend(node, step, done, create=isinstance(nxt, str), item=item)
    last = steps[-1]
    if isinstance(last, int):
        _descend(node, last, done, create=False, item=item)  # range check
    elif not isinstance(node, dict):
        raise ValueError(f"override {item!r}: {done} is not a section, it holds {_fmt(node)}")
    node[last] = value
    return key


def _descend(node: Any, step: str | int, done: str, *, create: bool, item: str) -> tuple[Any, str]:
    if isinstance(step, int):
        if not isinstance(node, list):
            raise ValueError(f"override {item!r}: {done} is not a list, it holds {_fmt(node)}")
        if not 0 <= step < len(node):
            raise ValueError(f"override {item!r}: {done} has {len(node)} entries, no index {step}")
        return node[step], f"{done}[{step}]"
    if not isinstance(node, dict):
        raise ValueError(f"override {item!r}: {done} is not a section, it holds {_fmt(node)}")
    if step not in node or (create and node[step] is None):
        node[step] = {}  # unknown keys are reported when the config is built
    return node[step], f"{done}.{step}" if done else step


def _build(cls, data: Any, key: str, ctx: _Ctx):
    where = key or "the config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of keys, got {_fmt(data)}")
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    for k in data:
        if k not in names:
            dotted = f"{key}.{k}" if key else str(k)
            close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            origin = " (from a command-line override)" if ctx.from_override(dotted) else ""
            raise ValueError(
                f"unknown key {dotted!r}{origin} in {'section ' + repr(key) if key else 'the top level'}; "
                f"{hint}valid keys: {', '.join(names)}"
            )
    kwargs = {}
    for f in fields(cls):
        dotted = f"{key}.{f.name}" if key else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], dotted, ctx)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{dotted} is missing; set it in the YAML or on the command line ({dotted}=...)")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, ctx: _Ctx) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, ctx)
    if is_dataclass(tp):
        return _build(tp, value, key, ctx)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key} must be one of {', '.join(map(repr, args))}, got {_fmt(value)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {_fmt(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {_fmt(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]", ctx) for i, (a, v) in enumerate(zip(args, value)))
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} must be a path (a non-empty string), got {_fmt(value)}")
        base = ctx.cwd if ctx.from_override(key) else ctx.yaml_dir
        return Path(os.path.abspath(base / Path(value).expanduser()))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if tp not in ok:
        raise TypeError(f"{key}: unsupported field type {tp!r}")  # a bug in this module
    if not ok[tp]:
        raise ValueError(f"{key} must be {_TYPE_NAMES[tp]}, got {_fmt(value)} ({type(value).__name__})")
    return float(value) if tp is float else value


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: its one-line docstring} of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _emit(obj: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    docs = field_docs(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        comment = f"  # {docs[f.name]}" if f.name in docs else ""
        if is_dataclass(value):
            lines.append(f"{pad}{f.name}:{comment}")
            _emit(value, indent + 2, lines)
        elif isinstance(value, list) and value and is_dataclass(value[0]):
            lines.append(f"{pad}{f.name}:{comment}")
            for item in value:
                start = len(lines)
                _emit(item, indent + 4, lines)
                lines[start] = f"{pad}  - {lines[start][indent + 4:]}"
        else:
            lines.append(f"{pad}{f.name}: {_scalar(_to_plain(value))}{comment}")


def _scalar(value: Any) -> str:
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=1 << 30).strip()
    text = text.removesuffix("...").strip()
    return text if "\n" not in text else json.dumps(value)  # JSON strings are valid YAML


def _to_plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_fields(obj: Any, section: str) -> None:
    """Literal choices hold, and str paths become Path (for configs built in Python)."""
    for f in fields(obj):
        tp, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        key = f"{section}.{f.name}" if section else f.name
        options = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and value is not None:
            tp = next(a for a in options if a is not type(None))
            options = typing.get_args(tp)
        if typing.get_origin(tp) is Literal and value not in options:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, options))}, got {_fmt(value)}")
        if tp is Path and isinstance(value, str):
            setattr(obj, f.name, Path(value))


def _at_least(obj: Any, section: str, name: str, low: float) -> None:
    value = getattr(obj, name)
    if value < low:
        raise ValueError(f"{section}.{name} ({value}) must be >= {low}")


def _positive(obj: Any, section: str, name: str) -> None:
    value = getattr(obj, name)
    if not value > 0:
        raise ValueError(f"{section}.{name} ({value}) must be > 0")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt_set(values: list[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
