"""Every config field is read by some code: a field that is accepted, documented and ignored is a
defect (users set it and nothing happens). The check walks every dataclass field of `Config`
(nested sections and list items included) and looks for an attribute access of that name in the
code outside the config modules (ast, not grep: comments and docstrings do not count)."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG_MODULES = {"megatron_vr1/config.py"}

# Fields deliberately read by no code outside the config modules, each with its reason.
EXCEPTIONS: dict[str, str] = {
    "slurm.procs_per_node": "read through the SlurmConfig.procs property (config.py), which slurm/render.py uses",
}


def _dataclass_types(tp) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [t for arg in typing.get_args(tp) for t in _dataclass_types(arg)]


def _fields(cls, prefix: str = "", seen=None) -> list[tuple[str, str]]:
    """(dotted path, attribute name) of every leaf field below `cls`."""
    seen = set() if seen is None else seen
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        nested = _dataclass_types(hints[f.name])
        if nested and nested[0] not in seen:
            out.append((path, f.name))  # the section itself is read too (cfg.grpo)
            for sub in nested:
                out += _fields(sub, path + ".", seen | {sub})
        else:
            out.append((path, f.name))
    return out


def _attributes_read() -> set[str]:
    names: set[str] = set()
    for root in ("megatron_vr1", "checkpoints_conv", "bench"):
        for py in (REPO / root).rglob("*.py"):
            if str(py.relative_to(REPO)) in CONFIG_MODULES:
                continue
            for node in ast.walk(ast.parse(py.read_text(), filename=str(py))):
                if isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" \
                        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    names.add(str(node.args[1].value))
    return names


def test_every_config_field_is_read_by_code():
    from megatron_vr1.config import Config

    read = _attributes_read()
    unread = [path for path, name in _fields(Config) if name not in read and path not in EXCEPTIONS]
    assert not unread, (f"config fields that no code reads (honour them, remove them, or list them in "
                        f"EXCEPTIONS with a reason): {unread}")


def test_the_walk_sees_the_fields_it_should():
    """The walk itself: it finds nested sections and list items, and flags a field nobody reads."""
    from megatron_vr1.config import Config

    paths = {p for p, _ in _fields(Config)}
    for p in ("grpo.kl_estimator", "grpo.entropy_coef", "checkpoint.keep_last", "logging.log_interval",
              "ptst.stages.max_response_length", "grpo.dynamic_sampling"):
        assert p in paths, p
    assert "async_save" not in {n for _, n in _fields(Config)}
    assert "no_such_field_xyz" not in _attributes_read()
