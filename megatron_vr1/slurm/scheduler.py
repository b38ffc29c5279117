"""The few Slurm commands we need (sbatch, scontrol, sacct), and the state of a submitted chain.

`slurm submit` records the chain in RUN/slurm/jobs.json; `slurm status` reads it and asks the
scheduler about each job: `scontrol show job` while the controller still holds the job (MinJobAge),
then `sacct` where the cluster keeps accounting. Polling `scontrol` is used instead of
`sbatch --wait`, which ties a client process to one job.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

JOBS_FILE = "jobs.json"
OK_STATES = {"COMPLETED"}
BAD_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
              "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmError(RuntimeError):
    pass


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"`{cmd[0]}` not found: run this on a Slurm login node (or install the client: "
                                "scripts/setup_slurm.sh sets up a local test cluster)")
    return subprocess.run(cmd, capture_output=True, text=True)


def sbatch(script: Path, *, after: Optional[str] = None, extra: tuple[str, ...] = ()) -> str:
    """Submits `script`; with `after`, only once that job completed successfully, and cancelled
    (not left pending forever) if it does not."""
    cmd = ["sbatch", "--parsable", *extra]
    if after:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    r = _run([*cmd, str(script)])
    if r.returncode != 0:
        raise SlurmError(f"sbatch {script} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]


def test_only(script: Path) -> tuple[bool, str]:
    """`sbatch --test-only`: would the scheduler accept and place this job? (ok, its message)"""
    r = _run(["sbatch", "--test-only", str(script)])
    msg = (r.stderr + r.stdout).strip()
    return r.returncode == 0 and "to start at" in msg, msg


@dataclass
class JobState:
    job_id: str
    state: str
    """Slurm job state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), or UNKNOWN."""
    exit_code: str = ""
    reason: str = ""
    restarts: int = 0

    @property
    def done(self) -> bool:
        return self.state in OK_STATES or self.state in BAD_STATES

    @property
    def failed(self) -> bool:
        return self.state in BAD_STATES


def job_state(job_id: str) -> JobState:
    r = _run(["scontrol", "show", "job", "-o", job_id])
    if r.returncode == 0 and "JobState=" in r.stdout:
        kv = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
        return JobState(job_id, kv.get("JobState", "UNKNOWN"), kv.get("ExitCode", ""), kv.get("Reason", ""),
                        int(kv.get("Restarts", "0") or 0))
    if shutil.which("sacct"):  # purged from the controller: accounting, where the cluster has it
        r = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,Reason"],
                           capture_output=True, text=True)
        line = r.stdout.strip().splitlines()[-1:] if r.returncode == 0 else []
        if line:
            state, code, reason = (line[0].split("|") + ["", "", ""])[:3]
            return JobState(job_id, state.split()[0], code, reason)
    return JobState(job_id, "UNKNOWN", reason="not known to scontrol (purged) and no accounting (sacct)")


# ----------------------------------------------------------------------------- the chain record


def write_chain(run_dir: Path, config: Path, jobs: list[dict]) -> Path:
    folder = Path(run_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / JOBS_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": str(config), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "jobs": jobs}, indent=1) + "\n")
    tmp.replace(out)
    return out


def read_chain(run_dir: Path) -> dict:
    f = Path(run_dir) / "slurm" / JOBS_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: submit the recipe first (megatron-vr1 slurm submit CONFIG), "
                                "or give the run_dir it was submitted with")
    return json.loads(f.read_text())


@dataclass
class ChainStatus:
    rows: list[dict]
    """One per job, in chain order: name, label, job_id, state, exit_code, reason, restarts."""
    failed: Optional[dict]
    """The first job that failed (its dependents are cancelled), or None."""

    @property
    def ok(self) -> bool:
        return all(r["state"] in OK_STATES for r in self.rows)

    @property
    def done(self) -> bool:
        """Every job completed, or one failed and every other job has ended (cancelled after it)."""
        return self.ok or (self.failed is not None and all(r["terminal"] for r in self.rows))


def chain_status(chain: dict) -> ChainStatus:
    rows, failed = [], None
    for job in chain["jobs"]:
        st = job_state(job["job_id"])
        row = {**job, **asdict(st), "terminal": st.done}
        rows.append(row)
        if st.failed and failed is None:
            failed = row
    return ChainStatus(rows, failed)


def describe(status: ChainStatus) -> str:
    """The status table, then one line saying how the chain stands."""
    lines = [f"{'job':<24} {'id':>8}  {'state':<11} {'exit':<6} {'restarts':>8}  what"]
    for r in status.rows:
        reason = f" [{r['reason']}]" if r["reason"] not in ("", "None") else ""
        lines.append(f"{r['name']:<24} {r['job_id']:>8}  {r['state']:<11} {r['exit_code']:<6} {r['restarts']:>8}  "
                     f"{r['label']}{reason}")
    if status.failed is not None:
        f = status.failed
        after = [r["name"] for r in status.rows if r is not f and r["state"] == "CANCELLED"
                 and "Dependency" in r["reason"]]
        lines.append(f"FAILED: {f['name']} ({f['label']}, job {f['job_id']}) ended {f['state']} with exit code "
                     f"{f['exit_code']}; see {f.get('log', 'its log')}"
                     + (f"; cancelled after it: {', '.join(after)}" if after else ""))
    elif status.ok:
        lines.append("COMPLETED: every job of the chain finished")
    else:
        running = [r["name"] for r in status.rows if not r["terminal"]]
        lines.append(f"IN PROGRESS: {', '.join(running)}")
    return "\n".join(lines)


def wait_chain(chain: dict, *, poll_s: float = 5.0, timeout_s: Optional[float] = None, on_change=None) -> ChainStatus:
    """Polls until every job ended, or one failed and the jobs after it were cancelled."""
    t0, last = time.time(), None
    while True:
        st = chain_status(chain)
        key = [(r["state"], r["restarts"]) for r in st.rows]
        if on_change is not None and key != last:
            on_change(st)
        last = key
        if st.done:
            return st
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise TimeoutError(f"the chain did not finish in {timeout_s:.0f} s:\n{describe(st)}")
        time.sleep(poll_s)
