"""Everything megatron-core needs to run without CUDA, in one place.

`setup()` is a no-op when CUDA is available. On a CPU-only torch it installs these shims
(docs/cpu.md lists the facts they answer):

- `torch.cuda.current_device()` returns the CPU device: megatron-core passes it as a `device=`
  argument (rotary buffers, TP comm buffers, p2p shape exchange, linear weight init).
- `torch.cuda.synchronize()` / `torch.cuda.current_stream()` are no-ops (p2p, checkpoint writer,
  megatron-core >= 0.19).
- A TorchFunctionMode (`cpu_device_mode`) maps `device="cuda"` to the CPU for factory calls and
  `.cuda()` / `.to("cuda")`; it is installed globally, because megatron-core builds such tensors
  in the schedules, the optimizer, grad clipping and the checkpoint exchange.
- `torch.Tensor.type()` answers `torch.cuda.FloatTensor`-style names for CPU tensors where the
  megatron optimizer checks them.

The CUDA RNG tracker: call `model_parallel_seed(seed)` (here) instead of megatron-core's
`model_parallel_cuda_manual_seed`; on CPU it selects the non-CUDA tracker.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False

CPU = torch.device("cpu")


def on_cuda() -> bool:
    """True when the trainer runs on GPUs (nothing here is patched then)."""
    return torch.cuda.is_available()


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class cpu_device_mode(TorchFunctionMode):
    """Maps any `device='cuda'` (or `.cuda()`, `.to('cuda')`) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if _is_cuda(dev) or (isinstance(dev, int) and not isinstance(dev, bool)):  # device=0 means cuda:0
            kwargs = dict(kwargs, device=CPU)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_mode_suspended():
    """Runs the block without the global `cpu_device_mode` (when it is the innermost mode).

    The mode costs a Python call per torch function call; code that never asks for a CUDA device
    (the vLLM engine's generation: ~50K torch calls per tiny RL step) runs faster without it."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if not isinstance(_get_current_function_mode(), cpu_device_mode):
        yield
        return
    with _pop_mode_temporarily():
        yield


def setup() -> None:
    """Install the CPU shims once per process (no-op on CUDA machines)."""
    global _INSTALLED
    if _INSTALLED or on_cuda():
        return
    _INSTALLED = True
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    torch.cuda.current_device = lambda: CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    class _NullStream:
        def synchronize(self):
            pass

        def wait_stream(self, *_):
            pass

        def record_event(self, *_):
            return None

    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]

    orig_type = torch.Tensor.type

    @functools.wraps(orig_type)
    def _type(self, *args, **kwargs):
        if args or kwargs:
            return orig_type(self, *args, **kwargs)
        name = orig_type(self)
        # megatron's optimizer asserts param.type() in ['torch.cuda.FloatTensor', ...]
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = _type  # type: ignore[assignment]
    # Activation recompute (parallel.recompute) saves and restores "the CUDA RNG state" around each
    # recomputed layer so dropout masks repeat; on CPU that state is the CPU generator's.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, clone=False, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # Global: megatron-core builds `device="cuda"` tensors in many places (schedules, optimizer,
    # clip_grads, dist-checkpoint exchange). The mode stays on for the whole process.
    cpu_device_mode().__enter__()


def model_parallel_seed(seed: int) -> None:
    """Seed torch and megatron-core's model-parallel RNG tracker (CPU-safe)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if on_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def init_distributed(parallel, seed: int) -> None:
    """The default process group (from torchrun's RANK/WORLD_SIZE/MASTER_*; a plain `python`
    process gets a one-rank group on a free port), megatron-core's TP/PP groups from the recipe's
    `parallel` section, and the seeds. Idempotent."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    setup()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]),
                                  RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if on_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend(), rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    parallel.dp(dist.get_world_size())  # checks that tp*pp divides the world size, naming the fix
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(parallel.tp, parallel.pp)
    model_parallel_seed(seed)


def backend() -> str:
    """torch.distributed backend for this machine."""
    return "nccl" if on_cuda() else "gloo"
