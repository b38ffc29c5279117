"""bench/resync.py's TP2 case: the trainer at TP2 and one vLLM engine of TP2 over two torchrun ranks
(the RL loop's resync path), smallest checkpoint, one run per phase."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "resync.py"


def test_tp2_refused_outside_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(BENCH), "--tp", "2"], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env)
    assert r.returncode != 0 and "torchrun" in r.stderr and "WORLD_SIZE 1" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_tp2_resync_bench_runs_and_keeps_greedy_output():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(BENCH),
           "--tp", "2", "--mb", "200", "--repeats", "1", "--bucket-mb", "64", "--no-profile"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    out = r.stdout
    assert r.returncode == 0, (out + r.stderr)[-6000:]
    assert "tensor_parallel_size 2, data_parallel_size 1, executor external_launcher" in out, out[-4000:]
    summary = [line for line in out.splitlines() if line.startswith("SUMMARY TP2 ")]
    assert len(summary) == 1 and "sanity PASS" in summary[0] and "resync@64MiB r0 " in summary[0], out[-4000:]
    rows = [line for line in out.splitlines() if line.startswith("resync, 64 MiB buckets")]
    assert [line.split()[4] for line in rows] == ["0", "1"], rows  # one row per rank
