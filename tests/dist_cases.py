"""Functions run on every rank by `distributed.run_distributed` (process group already up)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _init_layout(tp: int, pp: int, seed: int = 0) -> None:
    from megatron.core import parallel_state

    from megatron_vr1 import platform

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    platform.model_parallel_seed(seed)


def logits_parity(hf_dir: str, mcore_dir: str, layouts: list) -> dict:
    """Max |logit diff| vs transformers per probe, for each (tp, pp) layout."""
    from checkpoints_conv.verify import compare

    out = {}
    for tp, pp in layouts:
        _init_layout(tp, pp)
        out[f"tp{tp}pp{pp}"] = compare(hf_dir, mcore_dir, tp=tp, pp=pp)
    return out


def reshard_roundtrip(hf_dir: str, mcore_dir: str, work_dir: str, layouts: list) -> dict:
    """Load the converted checkpoint into the model at each layout, save it with megatron-core's own
    dist_checkpointing.save (sharded by that layout), export that to HF on rank 0 and compare
    every tensor with the original bit for bit. Returns {layout: number of tensors compared}."""
    from megatron.core import dist_checkpointing

    from checkpoints_conv.convert import mcore_to_hf
    from checkpoints_conv.hf_io import HFReader
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    arch = load_hf_arch(hf_dir)
    out = {}
    for tp, pp in layouts:
        _init_layout(tp, pp)
        model = build_model(arch, ModelOptions(tp=tp, pp=pp))
        load_weights(model, mcore_dir)
        saved = Path(work_dir) / f"tp{tp}pp{pp}"
        if dist.get_rank() == 0:
            saved.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(saved))
        dist.barrier()
        if dist.get_rank() == 0:
            exported = Path(work_dir) / f"hf-tp{tp}pp{pp}"
            mcore_to_hf(saved, exported, hf_config=hf_dir, progress=False)
            a, b = HFReader(hf_dir), HFReader(exported)
            assert sorted(a.raw_names.values()) == sorted(b.raw_names.values()), "key sets differ"
            for name in a.names():
                assert a.dtype(name) == b.dtype(name), name
                assert torch.equal(a.tensor(name), b.tensor(name)), f"{name} differs after tp{tp}pp{pp}"
            out[f"tp{tp}pp{pp}"] = len(a.names())
        dist.barrier()
    return out


def resync_tensors(hf_dir: str, mcore_dir: str, layouts: list, bucket_bytes: int) -> dict:
    """The resync's HF tensors at each layout equal the checkpoint's HF tensors bit for bit, on
    every rank, with no bucket above the limit (unless one tensor alone is larger)."""
    from checkpoints_conv.hf_io import HFReader
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.rollout.engine import UpdateStats
    from megatron_vr1.rollout.resync import hf_buckets

    arch = load_hf_arch(hf_dir)
    ref = HFReader(hf_dir)
    out = {}
    for tp, pp in layouts:
        _init_layout(tp, pp)
        model = build_model(arch, ModelOptions(tp=tp, pp=pp))
        load_weights(model, mcore_dir)
        stats = UpdateStats()
        seen = {}
        for bucket in hf_buckets(model, arch, bucket_bytes=bucket_bytes, stats=stats):
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            groups = {_hf_group(n) for n, _ in bucket}
            assert size <= bucket_bytes or len(groups) == 1, (size, groups)  # only a lone oversized group
            for name, t in bucket:
                seen[name] = bool(torch.equal(t, ref.tensor(name)))
        assert set(seen) == set(ref.names()), set(ref.names()) ^ set(seen)
        assert all(seen.values()), [k for k, v in seen.items() if not v]
        out[f"tp{tp}pp{pp}"] = {"tensors": stats.tensors, "buckets": stats.buckets}
    return out


def _hf_group(name: str) -> str:
    """The layer group of a canonical HF name: 'model.language_model.layers.3', 'model.visual.blocks.0',
    or the name itself for global tensors."""
    import re

    m = re.match(r"(.*\.(?:layers|blocks)\.\d+)\.", name)
    return m.group(1) if m else name


def engine_resync(hf_dir: str, mcore_dir: str, tp: int, pp: int, check_failure: bool = False,
                  engine_options: dict | None = None) -> dict:
    """Each rank holds its own in-process vLLM engine (TP=1) next to its Megatron shard.
    Before and after one gradient step + resync, the engine's logprobs of the same tokens equal
    the Megatron model's. Optionally: a resync that fails midway leaves the engine refusing to
    generate until a complete resync. `engine_options`: more `LLM()` arguments (e.g. the compiled
    engine: enforce_eager False)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from checkpoints_conv.verify import _image
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.models.qwen25_vl.io import load_weights, make_inputs
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.trainer.forward import sequence_logprobs
    from megatron_vr1.trainer.logprobs import tp_group, vocab_parallel_logprobs
    from megatron_vr1.rollout.engine import EngineWeightsInconsistent, RolloutPrompt, SamplingSettings
    from megatron_vr1.rollout.resync import hf_buckets
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    _init_layout(tp, pp)
    arch = load_hf_arch(hf_dir)
    engine = VLLMEngine(hf_dir, arch, max_model_len=512, kv_cache_bytes=16 * 2**20, engine_options=engine_options)
    model = build_model(arch, ModelOptions(tp=tp, pp=pp))
    load_weights(model, mcore_dir)
    proc = load_processor(hf_dir)

    def chat(text, n_images):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    prompts = [RolloutPrompt(chat("How many red shapes are there?", 0)),
               RolloutPrompt(chat("How many red shapes are there?", 1), [_image(112, 112, 7)])]
    # continuations sampled by the engine itself (what RL scores); 3 samples per prompt, so the
    # later samples are served the prompt's KV from the prefix cache (CPU_BLOCK_SIZE)
    groups = engine.generate(prompts, SamplingSettings(n=3, max_tokens=12, temperature=1.0, seed=3))

    def megatron_lp(sample=0):
        res = []
        for p, g in zip(prompts, groups):
            r = g[sample]
            enc = proc(text=[p.text], images=p.images or None, return_tensors="pt")
            assert enc["input_ids"][0].tolist() == r.prompt_ids, "processor and engine disagree on prompt ids"
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            inp = make_inputs(arch, ids, None, enc.get("pixel_values"), enc.get("image_grid_thw"))
            lp = sequence_logprobs(model, arch, inp)
            res.append(lp[0, len(r.prompt_ids) - 1:])
        return res

    def engine_lp():
        return [torch.tensor(x) for x in engine.prompt_logprobs(prompts, [g[0].response_ids for g in groups])]

    def maxdiff(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    out = {}
    before_m = megatron_lp()
    out["before"] = maxdiff(before_m, engine_lp())
    out["sampled_vs_megatron"] = max(maxdiff(before_m if k == 0 else megatron_lp(k),
                                             [torch.tensor(g[k].response_logprobs) for g in groups])
                                     for k in range(3))
    out["prompt_tokens"] = [len(g[0].prompt_ids) for g in groups]

    # one gradient step on the Megatron weights (the loss: -logp of the sampled image continuation)
    r = groups[1][0]
    enc = proc(text=[prompts[1].text], images=prompts[1].images, return_tensors="pt")
    ids = torch.tensor([r.prompt_ids + r.response_ids])
    inp = make_inputs(arch, ids, None, enc["pixel_values"], enc["image_grid_thw"])

    def gradient_step(lr):
        model.zero_grad()

        def forward_step(data_iterator, model_):
            logits = model_(next(data_iterator))

            def loss_fn(output):
                lp = vocab_parallel_logprobs(output[:, :-1], ids[:, 1:], vocab_size=arch.text.vocab_size,
                                             group=tp_group())
                loss = -lp[:, len(r.prompt_ids) - 1:].sum()
                return loss, {"loss": loss.detach()}

            return logits, loss_fn

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([inp]), model=[model],
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1, forward_only=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None and p.requires_grad:
                    p.add_(p.grad, alpha=-lr)

    gradient_step(0.05)
    after_m = megatron_lp()
    out["step_changed_logprobs_by"] = maxdiff(after_m, before_m)
    stats = engine.update_weights(hf_buckets(model, arch, bucket_bytes=1 << 20))
    out["resync_tensors"] = stats.tensors
    out["after"] = maxdiff(after_m, engine_lp())

    if check_failure:
        def bad_buckets():
            good = list(hf_buckets(model, arch, bucket_bytes=1 << 20))
            yield good[0]
            name, t = good[1][0]
            yield [(name, t[:-1])] + good[1][1:]  # a truncated tensor in the second bucket
        try:
            engine.update_weights(bad_buckets())
            out["bad_bucket_raised"] = False
        except ValueError as e:
            out["bad_bucket_raised"] = "has shape" in str(e)
        try:
            engine.generate(prompts[:1], SamplingSettings(max_tokens=4))
            out["dirty_engine_refused"] = False
        except EngineWeightsInconsistent:
            out["dirty_engine_refused"] = True
        engine.update_weights(hf_buckets(model, arch, bucket_bytes=1 << 20))
        out["after_recovery"] = maxdiff(after_m, engine_lp())
        # a frozen vision tower is not re-sent, and the engine still matches
        if model.vision_model is not None:
            for p in model.vision_model.parameters():
                p.requires_grad_(False)
        gradient_step(0.05)
        frozen_m = megatron_lp()
        stats = engine.update_weights(hf_buckets(model, arch, bucket_bytes=1 << 20, include_vision=False))
        out["frozen_vision_tensors_sent"] = stats.tensors
        out["after_frozen_vision_step"] = maxdiff(frozen_m, engine_lp())
    dist.barrier()
    engine.shutdown()
    return out


def engine_greedy_vs_transformers(hf_dir: str, max_pixels: int | None = None) -> dict:
    """Greedy generation from the vLLM engine equals transformers' generate (same allowed tokens),
    both given the same image-size bound (data.max_pixels)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from checkpoints_conv.verify import _image
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.rollout.engine import RolloutPrompt, SamplingSettings
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    _init_layout(1, 1)
    arch = load_hf_arch(hf_dir)
    engine = VLLMEngine(hf_dir, arch, max_model_len=512, kv_cache_bytes=16 * 2**20, max_pixels=max_pixels)
    proc = load_processor(hf_dir, max_pixels=max_pixels)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    banned = [i for i in range(arch.text.vocab_size) if i not in set(engine.allowed_token_ids)]

    def chat(text, n_images):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    prompts = [RolloutPrompt(chat("How many red shapes are there?", 0)),
               RolloutPrompt(chat("How many red shapes are there?", 1), [_image(112, 112, 5)]),
               RolloutPrompt(chat("Compare the two images.", 2), [_image(112, 112, 6), _image(168, 112, 8)])]
    groups = engine.generate(prompts, SamplingSettings(n=1, max_tokens=24, temperature=0.0))
    out = {}
    for k, (p, g) in enumerate(zip(prompts, groups)):
        enc = proc(text=[p.text], images=p.images or None, return_tensors="pt")
        with torch.no_grad():
            gen = hf.generate(**enc, do_sample=False, max_new_tokens=24, suppress_tokens=banned)
        ref = gen[0, enc["input_ids"].shape[1]:].tolist()
        ours = g[0].response_ids
        out[f"prompt{k}"] = {"equal": ours == ref, "tokens": len(ours), "finish": g[0].finish_reason,
                             "same_prompt": g[0].prompt_ids == enc["input_ids"][0].tolist(),
                             "image_tokens": g[0].prompt_ids.count(arch.image_token_id)}
    dist.barrier()
    engine.shutdown()
    return out


def update_invariance(hf_dir: str, mcore_dir: str, layouts: list) -> dict:
    """One GRPO optimizer step on the same fixed batch (two micro-batches: a text sample and an
    image sample) at each layout: loss, grad norm and the post-step logprobs per layout."""
    from checkpoints_conv.verify import probes
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights, make_inputs
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.trainer.forward import sequence_logprobs
    from megatron_vr1.config import OptimConfig
    from megatron_vr1.rl.update import LossSettings, PolicyMicroBatch, policy_update
    from megatron_vr1.trainer.core import build_optimizer, wrap_ddp

    arch = load_hf_arch(hf_dir)
    ps_ = {p.name: p.inputs for p in probes(hf_dir)}
    samples = [ps_["text"], ps_["one_image"]]
    S = max(x["input_ids"].shape[1] for x in samples) + 3
    out = {}
    for tp, pp, *flags in layouts:  # [tp, pp] or [tp, pp, "recompute"]
        _init_layout(tp, pp, seed=1234)
        model = build_model(arch, ModelOptions(tp=tp, pp=pp, recompute="recompute" in flags))
        load_weights(model, mcore_dir)
        mbs = []
        for k, x in enumerate(samples):
            n = x["input_ids"].shape[1]
            ids = torch.cat([x["input_ids"], torch.full((1, S - n), 302)], 1)
            am = torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, S - n, dtype=torch.long)], 1)
            inp = make_inputs(arch, ids, am, x.get("pixel_values"), x.get("image_grid_thw"))
            mask = torch.zeros(1, S - 1)
            mask[0, n - 12:n - 1] = 1  # the last 11 real tokens are "the response"
            old = sequence_logprobs(model, arch, inp)
            mbs.append(PolicyMicroBatch(inputs=inp, loss_mask_BT=mask, old_logp_BT=old,
                                        adv_B=torch.tensor([1.0 if k == 0 else -0.5]), ref_logp_BT=old.clone()))
        # every data-parallel replica gets the same two samples: the global batch is dp copies
        from megatron.core import parallel_state as ps

        dp = ps.get_data_parallel_world_size()
        gt = float(sum(mb.loss_mask_BT.sum() for mb in mbs)) * dp
        ddp = wrap_ddp(model)
        opt = build_optimizer(ddp, OptimConfig(lr=1e-3, weight_decay=0.0))
        m = policy_update(ddp, opt, mbs, arch, LossSettings(clip_low=0.2, clip_high=0.2, kl_beta=0.01),
                          global_tokens=gt, global_seqs=2 * dp, seq_length=S)
        after = [float((sequence_logprobs(model, arch, mb.inputs) * mb.loss_mask_BT).sum()) for mb in mbs]
        out[f"tp{tp}pp{pp}" + "".join(f"_{f}" for f in flags)] = {"loss": m.loss, "kl": m.kl, "ratio_mean": m.ratio_mean, "clip_frac": m.clip_frac,
                                "grad_norm": m.grad_norm, "after": after}
    return out


def vocab_parallel_vs_full(vocab_size: int, padded: int, temperature: float) -> dict:
    """Each rank holds its slice of the same random [B, T, padded] logits: the vocabulary-parallel
    logprobs, their gradient and the entropy against the single-process functions on the full
    logits (padded columns excluded)."""
    import torch.distributed as dist

    from megatron_vr1.rl.grpo import entropy, token_logprobs
    from megatron_vr1.trainer.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 5, padded, generator=g) * 4
    full[..., vocab_size:] = 50.0  # garbage in the padding must not leak into anything
    targets = torch.randint(0, vocab_size, (3, 5), generator=g)
    targets[0, 0] = vocab_size - 1  # the last real id: on the last rank, next to the padding
    grad_out = torch.randn(3, 5, generator=g)
    width = padded // world
    local = full[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(local, targets, vocab_size, temperature, dist.group.WORLD)
    (lp * grad_out).sum().backward()
    ent = vocab_parallel_entropy(local.detach(), vocab_size, dist.group.WORLD)

    ref_in = full.clone().requires_grad_(True)
    ref = token_logprobs(ref_in, targets, vocab_size=vocab_size, temperature=temperature)
    (ref * grad_out).sum().backward()
    ref_grad = ref_in.grad[..., rank * width:(rank + 1) * width]
    return {
        "logp": float((lp - ref).abs().max()),
        "grad": float((local.grad - ref_grad).abs().max()),
        "grad_scale": float(ref_grad.abs().max()),
        "padding_grad": float(local.grad[..., max(vocab_size - rank * width, 0):].abs().max()) if (rank + 1) * width > vocab_size else 0.0,
        "entropy": float((ent - entropy(full, vocab_size)).abs().max()),
        "finite": bool(torch.isfinite(lp).all() and torch.isfinite(ent).all()),
    }


def engine_replicas(hf_dir: str, mcore_dir: str, rollout_tp: int, layouts: list, greedy_tokens: int = 16) -> dict:
    """One vLLM engine per rollout-TP group (`world / rollout_tp` replicas, external_launcher when
    the world has more than one rank) next to the Megatron trainer at each (tp, pp) layout.
    Returns, on every rank: the greedy rollouts of a fixed prompt set (each replica generated its
    slice, gathered with `replicas.generate_groups`), and for each layout the max |engine - trainer|
    logprob of engine-sampled tokens before and after one gradient step + resync (full HF buckets
    into every shard), and a check that an asleep engine refuses to generate."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from checkpoints_conv.verify import _image
    from megatron_vr1.config import load_hf_arch
    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.models.qwen25_vl.io import load_weights, make_inputs
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.rollout.engine import RolloutPrompt, SamplingSettings
    from megatron_vr1.rollout.replicas import ReplicaLayout, generate_groups
    from megatron_vr1.rollout.resync import hf_buckets
    from megatron_vr1.rollout.vllm_engine import VLLMEngine
    from megatron_vr1.trainer.forward import sequence_logprobs
    from megatron_vr1.trainer.logprobs import tp_group, vocab_parallel_logprobs

    tp0, pp0 = layouts[0]
    _init_layout(tp0, pp0)
    arch = load_hf_arch(hf_dir)
    engine = VLLMEngine(hf_dir, arch, max_model_len=512, kv_cache_bytes=16 * 2**20, tensor_parallel_size=rollout_tp)
    proc = load_processor(hf_dir)
    lay = ReplicaLayout.current(rollout_tp)

    def chat(text, n_images):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    prompts = [RolloutPrompt(chat("How many red shapes are there?", 0)),
               RolloutPrompt(chat("How many red shapes are there?", 1), [_image(112, 112, 7)]),
               RolloutPrompt(chat("How many blue circles are there?", 1), [_image(112, 112, 9)]),
               RolloutPrompt(chat("Count the squares.", 0))]
    everything = list(range(len(prompts)))
    pc = engine.llm.llm_engine.vllm_config.parallel_config
    out: dict = {"replica": lay.replica, "replicas": lay.replicas, "shard": lay.shard,
                 "vllm": [pc.tensor_parallel_size, pc.data_parallel_size, pc.data_parallel_rank,
                          pc.distributed_executor_backend]}
    greedy = generate_groups(engine, len(prompts), prompts.__getitem__,
                             SamplingSettings(n=1, max_tokens=greedy_tokens, temperature=0.0), everything)
    out["greedy"] = [g[0].response_ids for g in greedy]
    out["greedy_has_images"] = [len(g[0].images) for g in greedy] == [len(p.images) for p in prompts]
    sampled = generate_groups(engine, len(prompts), prompts.__getitem__,
                              SamplingSettings(n=2, max_tokens=10, temperature=1.0, seed=3), everything)
    pairs = [(p, r) for p, g in zip(prompts, sampled) for r in g if r.response_ids]

    engine.sleep()
    try:
        engine.generate(prompts[:1], SamplingSettings(max_tokens=2))
        out["asleep_refused"] = False
    except RuntimeError:
        out["asleep_refused"] = True
    engine.wake_up()

    def maxdiff(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    for k, (tp, pp) in enumerate(layouts):
        _init_layout(tp, pp)
        model = build_model(arch, ModelOptions(tp=tp, pp=pp))
        load_weights(model, mcore_dir)
        if k:  # the engine holds the previous layout's stepped weights: start from this model's
            engine.update_weights(hf_buckets(model, arch, bucket_bytes=1 << 20))

        def megatron_lp():
            res = []
            for p, r in pairs:
                enc = proc(text=[p.text], images=p.images or None, return_tensors="pt")
                assert enc["input_ids"][0].tolist() == r.prompt_ids, "processor and engine disagree on prompt ids"
                ids = torch.tensor([r.prompt_ids + r.response_ids])
                inp = make_inputs(arch, ids, None, enc.get("pixel_values"), enc.get("image_grid_thw"))
                res.append(sequence_logprobs(model, arch, inp)[0, len(r.prompt_ids) - 1:])
            return res

        def engine_lp():
            return [torch.tensor(x) for x in engine.prompt_logprobs([p for p, _ in pairs], [r.response_ids for _, r in pairs])]

        before = megatron_lp()
        res = {"before": maxdiff(before, engine_lp()),
               "sampled_vs_megatron": maxdiff(before, [torch.tensor(r.response_logprobs) for _, r in pairs])}
        p, r = next((p, r) for p, r in pairs if p.images)
        enc = proc(text=[p.text], images=p.images, return_tensors="pt")
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        inp = make_inputs(arch, ids, None, enc["pixel_values"], enc["image_grid_thw"])
        model.zero_grad()

        def forward_step(data_iterator, model_):
            logits = model_(next(data_iterator))

            def loss_fn(output):
                lp = vocab_parallel_logprobs(output[:, :-1], ids[:, 1:], vocab_size=arch.text.vocab_size, group=tp_group())
                loss = -lp[:, len(r.prompt_ids) - 1:].sum()
                return loss, {"loss": loss.detach()}

            return logits, loss_fn

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([inp]), model=[model],
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1, forward_only=False)
        with torch.no_grad():
            for prm in model.parameters():
                if prm.grad is not None and prm.requires_grad:
                    prm.add_(prm.grad, alpha=-0.05)
        after = megatron_lp()
        res["step_changed_logprobs_by"] = maxdiff(after, before)
        engine.sleep()  # the loop's order: asleep while training, awake for the resync
        engine.wake_up()
        res["resync_tensors"] = engine.update_weights(hf_buckets(model, arch, bucket_bytes=1 << 20)).tensors
        res["after"] = maxdiff(after, engine_lp())
        out[f"tp{tp}pp{pp}"] = res
    dist.barrier()
    engine.shutdown()
    return out


def loop_engine_calls(config: str, overrides: list) -> list:
    """Runs `rl.loop.train` with the real engine's and the trainer's phases wrapped to record the
    order of calls: the engine's generate / sleep / wake_up / update_weights, and the trainer's
    logprob pass and policy update."""
    import functools

    from megatron_vr1.config import load_config, load_hf_arch
    from megatron_vr1.rl import loop
    from megatron_vr1.rollout.vllm_engine import VLLMEngine

    calls: list = []

    def record(owner, name, label=None):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls.append(label or name)
            return fn(*args, **kwargs)

        setattr(owner, name, wrapper)

    for name in ("generate", "sleep", "wake_up", "update_weights", "prompt_logprobs"):
        record(VLLMEngine, name)
    record(loop, "prepare_batches", "trainer:logprobs")
    record(loop, "policy_updates", "trainer:update")
    cfg = load_config(config, overrides)
    arch = load_hf_arch(cfg.model.hf_path)
    cfg.validate_against(arch)
    loop.train(cfg, arch)
    return calls


def _packing_rollouts(hf_dir: str):
    """12 rollouts (4 prompts x 3 samples; two prompts with an image, of two sizes) with responses
    of different lengths, as the RL loop would hold them."""
    from PIL import Image

    from megatron_vr1.hf_processor import load_processor
    from megatron_vr1.rl.batch import ScoredRollout
    from megatron_vr1.rollout.engine import Rollout

    proc = load_processor(hf_dir)
    tok = proc.tokenizer
    g = torch.Generator().manual_seed(5)
    prompts = [("How many red shapes are there?", (56, 56)), ("Count the shapes.", None),
               ("How many red shapes are in the picture?", (84, 56)), ("What is 3 + 4?", None)]
    out = []
    for i, (q, size) in enumerate(prompts):
        content = ([{"type": "image"}] if size else []) + [{"type": "text", "text": q}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        images = []
        if size:
            arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
            images = [Image.fromarray(arr)]
        ids = proc(text=[text], images=images or None, return_tensors="pt")["input_ids"][0].tolist()
        for j in range(3):
            reps = (2 + 3 * j) if size else j % 2  # long answers to image prompts, short ones to text prompts
            resp = "<think>" + " I count the red ones again." * reps + f"</think> \\boxed{{{i + j}}}"
            r_ids = tok.encode(resp, add_special_tokens=False)
            lp = (-torch.rand(len(r_ids), generator=g)).tolist()
            r = Rollout(prompt_index=i, sample_index=j, prompt_ids=ids, response_ids=r_ids, response_logprobs=lp,
                        finish_reason="stop", response_text=resp, images=images, seconds=0.0)
            out.append(ScoredRollout(r, reward=float(j == 0), correct=j == 0, format_ok=True,
                                     advantage=[1.0, -0.5, -0.5][j] * (1 + 0.1 * i)))
    return proc, out


def packing_equivalence(hf_dir: str, mcore_dir: str, layouts: list) -> dict:
    """Padding-free RL micro-batches (rl/batch.py), without and with prompt sharing, against one
    rollout per row: per-rollout
    logprobs, and one GRPO optimizer step (loss, grad norm), at each (tp, pp) layout."""
    from megatron.core import parallel_state as ps

    from megatron_vr1.config import OptimConfig, load_hf_arch
    from megatron_vr1.models.qwen25_vl.io import load_weights
    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model
    from megatron_vr1.rl.batch import collate
    from megatron_vr1.rl.update import LossSettings, policy_update
    from megatron_vr1.trainer.core import build_optimizer, wrap_ddp
    from megatron_vr1.trainer.forward import sequence_logprobs

    arch = load_hf_arch(hf_dir)
    proc, scored = _packing_rollouts(hf_dir)
    pad = proc.tokenizer.pad_token_id
    out = {}
    for tp, pp in layouts:
        for mode in ("rows", "packed", "shared"):
            _init_layout(tp, pp, seed=1234)
            model = build_model(arch, ModelOptions(tp=tp, pp=pp))
            load_weights(model, mcore_dir)
            kw = {"rows": dict(pack=False, micro_batch_size=1),
                  "packed": dict(pack=True, share_prompts=False, max_tokens=400),
                  "shared": dict(pack=True, share_prompts=True, max_tokens=400)}[mode]
            mbs, S = collate(scored, proc, arch, pad, n_steps=1, same_shape=pp > 1, **kw)
            per = {}
            for mb in mbs:
                lp = mb.unpack(sequence_logprobs(model, arch, mb.inputs)) * mb.loss_mask_BT
                mb.old_logp_BT = lp
                mb.ref_logp_BT = lp.clone()
                for k in range(lp.shape[0]):
                    eng = mb.engine_logp_BT[k][mb.loss_mask_BT[k].bool()]  # unique random numbers: the rollout's id
                    key = next(s for s in scored if len(s.rollout.response_ids) == len(eng) and
                               torch.equal(torch.tensor(s.rollout.response_logprobs, dtype=torch.float32), eng))
                    per.setdefault(f"{key.rollout.prompt_index}/{key.rollout.sample_index}", []).append(
                        lp[k][mb.loss_mask_BT[k].bool()].tolist())
            dp = ps.get_data_parallel_world_size()
            gt = float(sum(mb.loss_mask_BT.sum() for mb in mbs)) * dp
            gs = float(sum(mb.loss_mask_BT.shape[0] for mb in mbs)) * dp
            ddp = wrap_ddp(model)
            opt = build_optimizer(ddp, OptimConfig(lr=1e-3, weight_decay=0.0))
            m = policy_update(ddp, opt, mbs, arch, LossSettings(kl_beta=0.01), global_tokens=gt, global_seqs=gs,
                              seq_length=S)
            out[f"tp{tp}pp{pp}_{mode}"] = {
                "micro_batches": len(mbs), "rows": sum(mb.inputs.input_ids_BS.shape[0] for mb in mbs),
                "tokens": sum(mb.inputs.input_ids_BS.numel() for mb in mbs), "logp": per,
                "loss": m.loss, "grad_norm": m.grad_norm, "kl": m.kl, "ratio_mean": m.ratio_mean}
    return out
