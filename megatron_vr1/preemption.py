"""Stop cleanly when the cluster asks: finish the step, save a checkpoint, exit with EXIT_PREEMPTED.

Slurm sends SIGUSR1 before a job's time limit (`#SBATCH --signal=B:USR1@<secs>`, forwarded to
the trainer by slurm/common.sh) and SIGTERM on preemption or `scancel`. The handler only sets a
flag; the training loop asks `stop.requested()` after each step. Under several ranks the
signal may reach them at different moments (or only some of them), so the answer is agreed with
an all_reduce(MAX) over the default group: every rank stops after the same step and saves the
same checkpoint together. The loop then exits with EXIT_PREEMPTED; the batch script requeues the
job and the next run resumes from `checkpoints/latest`.

    stop = preemption.install()
    for step in ...:
        ...
        if stop.requested():       # collective: every rank calls it after every step
            save(...)
            preemption.exit_preempted()
"""

from __future__ import annotations

import logging
import signal
import sys

import torch
import torch.distributed as dist

log = logging.getLogger("megatron_vr1.preemption")

EXIT_PREEMPTED = 75
"""Exit status after a checkpoint was saved on a signal (EX_TEMPFAIL: run me again)."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by SIGUSR1/SIGTERM; `requested()` agrees on it across ranks."""

    def __init__(self):
        self.signum: int | None = None

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            # logging from a signal handler may deadlock on the handler's lock: write directly
            print(f"megatron-vr1: got {signal.Signals(signum).name}: saving a checkpoint after this step",
                  file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """True on every rank when any rank got a signal. A collective when torch.distributed is
        initialised with more than one rank: call it at the same point on all ranks."""
        local = self.signum is not None
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def install(signals=SIGNALS) -> StopFlag:
    """Installs the handlers (main thread only) and returns the flag they set."""
    stop = StopFlag()
    for s in signals:
        signal.signal(s, stop._handler)
    return stop


def exit_preempted() -> None:
    """Leave with EXIT_PREEMPTED (after the checkpoint is written)."""
    log.info("checkpoint saved after a stop signal; exiting with status %d (requeue me)", EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)
