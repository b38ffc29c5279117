"""Start-up hook of the megatron-vr1 venv (installed by scripts/setup.sh as a .pth): one
torch.compile kernel cache per instruction-set cap (inductor's, and vLLM's compile cache, which
holds the compiled rollout model: `rollout.compile`).

vLLM compiles a few CPU ops with torch.compile even in eager mode (e.g. the vocabulary-parallel
input masking at TP > 1). Inductor's on-disk cache key does not include the ATen / oneDNN caps
(`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`), so after a native run a capped run on the same
machine reused its entries and the TP2 engine then produced out-of-range token ids
(IndexError in the embedding). With a cap set, and no cache folder chosen by the user, each cap
gets a folder of its own. This must run before torch is imported, hence a start-up hook.
"""

import os


def _install() -> None:
    caps = [os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")]
    if not any(caps):
        return
    import getpass
    import re
    import tempfile

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "user"
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(c or "native" for c in caps))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_isa-{tag}"))
    if "VLLM_CACHE_ROOT" not in os.environ:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm")
        os.environ["VLLM_CACHE_ROOT"] = f"{base}_isa-{tag}"


_install()
