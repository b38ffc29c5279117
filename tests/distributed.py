"""Run a function from `dist_cases.py` on N local processes joined by a gloo process group.

Like OLMo-core's `run_distributed_test`: each rank is a fresh `python` process (megatron-core
keeps global state), results come back as JSON, and a failing rank's stderr is shown.
Process start costs seconds, so a case usually loops over several layouts in one launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(case: str, world_size: int, timeout: float = 900, **kwargs) -> list:
    """Returns the list of per-rank return values of `dist_cases.<case>(**kwargs)`."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs = []
        for rank in range(world_size):
            out = Path(tmp) / f"rank{rank}"
            cmd = [sys.executable, str(HERE / "_dist_worker.py"), case, json.dumps(kwargs), str(out)]
            procs.append((subprocess.Popen(cmd, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                           stdout=open(f"{out}.log", "w"), stderr=subprocess.STDOUT), out))
        failed = []
        for rank, (p, out) in enumerate(procs):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q, _ in procs:
                    q.kill()
                rc = "timeout"
            if rc != 0:
                failed.append((rank, rc, Path(f"{out}.log").read_text()[-6000:]))
        if failed:
            rank, rc, log = failed[0]
            raise AssertionError(f"rank {rank} of {world_size} failed ({rc}) in {case}:\n{log}")
        return [json.loads((Path(tmp) / f"rank{r}").read_text()) for r in range(world_size)]
