"""The declarative HF <-> Megatron map, checked against independent formulas and the model itself."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

from checkpoints_conv.arch import load_hf_arch, padded_sizes
from checkpoints_conv.mapping import canonical_hf_name, expected_hf_shapes, plan

QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl", "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                    "vocab_size": 152064, "rms_norm_eps": 1e-6, "max_position_embeddings": 128000,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                      "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112},
}  # fmt: skip


def arch_7b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_VL_7B))
    return load_hf_arch(tmp_path)


def test_every_hf_element_lands_exactly_once_7b(tmp_path):
    """Each HF tensor is covered by its segments exactly once; Megatron tensors are covered
    exactly once by segments plus padding."""
    arch = arch_7b(tmp_path)
    shapes = expected_hf_shapes(arch)
    covered = {n: torch.zeros(s[0], dtype=torch.int) for n, s in shapes.items()}
    cols = {}
    for p in plan(arch, shapes):
        dst = torch.zeros(p.shape[p.axis], dtype=torch.int)
        for seg in p.segments:
            dst[seg.dst:seg.dst + seg.length] += 1
            if seg.hf is None:
                continue
            if p.axis == 0:
                covered[seg.hf][seg.src:seg.src + seg.length] += 1
            else:
                cols.setdefault(seg.hf, torch.zeros(shapes[seg.hf][1], dtype=torch.int))[seg.src:seg.src + seg.length] += 1
        assert torch.all(dst == 1), p.key
    for n, c in covered.items():
        if n in cols:
            assert torch.all(cols[n] == 1), n
        else:
            assert torch.all(c == 1), n
    pad = padded_sizes(arch)
    assert (pad.vocab, pad.vision_ffn) == (152064, 3456) and pad.vision_ffn % 8 == 0


def test_lm_qkv_layout_matches_reference_formula(tmp_path):
    """docs/design.md: q.view(H,d,h), k,v.view(G,d,h); per group cat(q[g*n:(g+1)*n], k[g], v[g])."""
    arch = arch_7b(tmp_path)
    t = arch.text
    H, G, d, h = t.num_heads, t.num_kv_heads, t.head_dim, 8  # small hidden for the check
    q, k, v = torch.randn(H * d, h), torch.randn(G * d, h), torch.randn(G * d, h)
    n = H // G
    qv, kv, vv = q.view(H, d, h), k.view(G, d, h), v.view(G, d, h)
    ref = torch.cat([torch.cat([qv[g * n:(g + 1) * n], kv[g:g + 1], vv[g:g + 1]]) for g in range(G)]).reshape(-1, h)
    shapes = dict(expected_hf_shapes(arch))
    p = next(p for p in plan(arch, shapes) if p.key.endswith("language_model.decoder.layers.self_attention.linear_qkv.weight"))
    src = {p.segments[0].hf: q, p.segments[1].hf: k, p.segments[2].hf: v}
    ours = torch.cat([src[s.hf][s.src:s.src + s.length] for s in p.segments])
    assert torch.equal(ours, ref)


def test_vision_qkv_per_head_layout(tmp_path):
    arch = arch_7b(tmp_path)
    H, d, h = arch.vision.num_heads, arch.vision.hidden_size // arch.vision.num_heads, 4
    qkv = torch.randn(3 * H * d, h)
    ref = qkv.view(3, H, d, h).transpose(0, 1).reshape(-1, h)  # docs/design.md: view(3,heads,d,h).transpose(0,1)
    p = next(p for p in plan(arch, expected_hf_shapes(arch)) if p.key.endswith("vision_model.decoder.layers.self_attention.linear_qkv.weight"))
    ours = torch.cat([qkv[s.src:s.src + s.length] for s in p.segments])
    assert torch.equal(ours, ref)


def test_merger_is_not_gated(tmp_path):
    """mbridge #93: the merger fc1 must be a plain copy (split by rows under TP), not [gate; up]."""
    arch = arch_7b(tmp_path)
    p = next(p for p in plan(arch, expected_hf_shapes(arch)) if p.key == "vision_model.projection.linear_fc1.weight")
    assert [(s.hf, s.src, s.dst, s.length) for s in p.segments] == [("model.visual.merger.mlp.0.weight", 0, 0, 5120)]


def test_key_schemes():
    assert canonical_hf_name("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical_hf_name("visual.blocks.0.attn.qkv.bias") == "model.visual.blocks.0.attn.qkv.bias"
    assert canonical_hf_name("model.visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"
    assert canonical_hf_name("lm_head.weight") == "lm_head.weight"


def test_plan_matches_model_sharded_state_dict(tiny_hf, single_rank):
    """The converter's keys and global shapes are exactly the model's checkpoint keys (TP=PP=1)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megatron_vr1.models.qwen25_vl.model import ModelOptions, build_model

    arch = load_hf_arch(tiny_hf)
    model = build_model(arch, ModelOptions())
    model_keys = {}
    for v in model.sharded_state_dict().values():
        if isinstance(v, ShardedObject):
            continue
        if isinstance(v, ShardedTensorFactory):
            sh = v.build()
            v = sh[0] if isinstance(sh, list) else sh
        assert isinstance(v, ShardedTensor)
        model_keys[v.key] = tuple(v.global_shape)
    ours = {p.key: p.global_shape for p in plan(arch, expected_hf_shapes(arch))}
    assert ours == model_keys


# ---- package boundaries --------------------------------------------------------------------

PACKAGES = ("megatron_vr1", "checkpoints_conv")
REPO = Path(__file__).resolve().parent.parent


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def _cross_private_uses(path: Path, own: str, root: Path = REPO) -> list[str]:
    """`own` package module `path` using a `_private` name (or module) of the other package:
    `from other.x import _y`, `from other._x import y`, `import other._x`, or `m._y` where `m`
    names a module of the other package."""
    tree = ast.parse(path.read_text(), str(path))
    other = {p for p in PACKAGES if p != own}

    def foreign(module: str | None) -> bool:
        return bool(module) and module.split(".")[0] in other

    bad, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and foreign(node.module):
            for a in node.names:
                if _private(node.module) or _private(a.name):
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: from {node.module} import {a.name}")
                modules.add(a.asname or a.name)  # may be a submodule; attribute checks below
        elif isinstance(node, ast.Import):
            for a in node.names:
                if foreign(a.name):
                    if _private(a.name):
                        bad.append(f"{path.relative_to(root)}:{node.lineno}: import {a.name}")
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                bad.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_packages_use_only_public_names_of_each_other():
    """megatron_vr1 and checkpoints_conv may import each other's public names only, so either can
    rename its private helpers freely (the converter stands alone: architecture and padding rules
    live in checkpoints_conv.arch)."""
    bad = []
    for pkg in PACKAGES:
        files = sorted((REPO / pkg).rglob("*.py"))
        assert files, pkg
        for f in files:
            bad += _cross_private_uses(f, pkg)
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


def test_boundary_check_catches_private_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from checkpoints_conv.convert import _commit, FORMAT\nimport checkpoints_conv.convert as cc\n"
                 "cc._prepare_output\nfrom megatron_vr1.config import _fmt\nimport checkpoints_conv._x\n")
    bad = _cross_private_uses(f, "megatron_vr1", root=tmp_path)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "from checkpoints_conv.convert import _commit", "import checkpoints_conv._x", "cc._prepare_output"]
