# Sourced by every megatron-vr1 sbatch script: the job's environment, the torchrun rendezvous and
# the time-limit/preemption protocol. Nothing here is specific to one site; site knobs are read from
# the environment of `sbatch` (exported by default), so set them in your shell or your ~/.bashrc.

# ---------------------------------------------------------------- environment
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}        # torchrun's default too; the CPU test cluster needs it
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP/SP overlap needs one queue
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job, not a hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# InfiniBand / RoCE (H800 nodes: 8 x 400G NICs, GPUDirect RDMA). Site-specific; set them before sbatch:
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...        the compute NICs (`ibstat`); leave out the storage/management ones
#   NCCL_SOCKET_IFNAME=ib0 / bond0       the interface of the bootstrap sockets (not docker0/lo)
#   NCCL_IB_GID_INDEX=3                  RoCE v2 only (InfiniBand needs none)
#   NCCL_NET_GDR_LEVEL=PHB               GPUDirect RDMA when NIC and GPU share a PCIe switch
#   NCCL_IB_TIMEOUT=22 NCCL_IB_RETRY_CNT=13   ride out link flaps on large jobs
#   NCCL_NVLS_ENABLE=0                   if NVLink SHARP hangs on your driver
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-13}

# ---------------------------------------------------------------- Python
# Which Python runs the job (VR1_PYTHON, used by the srun line):
#   1. MEGATRON_VR1_VENV, when set for the job (export it before sbatch; in a container job, a venv
#      path inside the container, e.g. one made with SETUP_GPU_IN_PLACE=0 on a mounted file system);
#   2. no container: the venv active when sbatch ran (VIRTUAL_ENV), else the venv that rendered
#      this script (VR1_DEFAULT_VENV, written by `megatron-vr1 slurm submit`);
#   3. otherwise `python` on PATH (a container: the image's Python, e.g. an NGC PyTorch image
#      set up with SETUP_GPU_IN_PLACE=1 bash scripts/setup_gpu.sh).
if [[ -n ${MEGATRON_VR1_VENV:-} ]]; then
  VR1_VENV=$MEGATRON_VR1_VENV
elif ((${VR1_IN_CONTAINER:-0} == 0)); then
  VR1_VENV=${VIRTUAL_ENV:-${VR1_DEFAULT_VENV:-}}
else
  VR1_VENV=
fi
if [[ -n $VR1_VENV ]]; then
  VR1_PYTHON=$VR1_VENV/bin/python
  if ((${VR1_IN_CONTAINER:-0} == 0)); then
    [[ -x $VR1_PYTHON ]] || { echo "vr1: no Python at $VR1_PYTHON (MEGATRON_VR1_VENV / the submitter's venv)" >&2; exit 1; }
    # shellcheck disable=SC1091
    source "$VR1_VENV/bin/activate"
  fi
else
  VR1_PYTHON=python
fi
export VR1_PYTHON
echo "vr1: Python $VR1_PYTHON" >&2

# ---------------------------------------------------------------- rendezvous
# One torchrun per node (srun --ntasks-per-node=1); they meet at the first host of the allocation.
VR1_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
VR1_MASTER_PORT=${VR1_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# torchrun forwards SIGUSR1 to its workers (and waits for them to save) instead of dying from it.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${VR1_SIGNAL_SECONDS:-600}}
VR1_TORCHRUN=(-m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$VR1_PROCS_PER_NODE"
  --rdzv-backend=c10d --rdzv-endpoint="$VR1_MASTER_ADDR:$VR1_MASTER_PORT" --rdzv-id="$SLURM_JOB_ID")
# srun does not inherit sbatch's --cpus-per-task (Slurm 22.05-23.02): pass it on.
VR1_SRUN=(--ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && VR1_SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

echo "vr1: job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST," \
  "rendezvous $VR1_MASTER_ADDR:$VR1_MASTER_PORT, $(date -Is)" >&2

# ---------------------------------------------------------------- time limit and preemption
# `#SBATCH --signal=B:USR1@N` sends SIGUSR1 to this shell N seconds before the time limit (and an
# operator can do the same with `scancel --batch --signal=USR1 JOBID`). The trap passes it to the
# job step (torchrun and the trainer processes); the trainer finishes its step, saves a
# checkpoint and exits (status 75); then this job requeues itself and the next run resumes from
# that checkpoint. A node failure requeues the job too (--requeue); it resumes from the last
# periodic checkpoint.
VR1_STOP_REQUESTED=0
vr1_on_usr1() {
  VR1_STOP_REQUESTED=1
  echo "vr1: SIGUSR1 at $(date -Is): asking the trainer to save and stop" >&2
  scancel --signal=USR1 "$SLURM_JOB_ID"   # every step of the job, not this batch shell
}
trap vr1_on_usr1 USR1

# vr1_wait PID: waits for the srun in the background (so the trap can run), then requeues the job
# if the trainer stopped on a signal, or exits with srun's status.
vr1_wait() {
  local pid=$1 rc
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" 2>/dev/null || true    # returns early when a trap runs
  done
  wait "$pid" 2>/dev/null && rc=0 || rc=$?
  if ((rc != 0)) && { ((VR1_STOP_REQUESTED)) || ((rc == 75)); }; then
    if ((${SLURM_RESTART_COUNT:-0} >= ${VR1_MAX_REQUEUES:-20})); then
      echo "vr1: stopped on a signal, but already restarted ${SLURM_RESTART_COUNT} times: not requeueing" >&2
      exit "$rc"
    fi
    echo "vr1: checkpoint saved; requeueing job $SLURM_JOB_ID (it resumes from checkpoints/latest)" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "vr1: scontrol requeue failed: resubmit this script to resume" >&2
    sleep 10   # the requeue ends this shell; if it did not, the stage is unfinished: fail (dependents cancelled)
    exit 75
  fi
  echo "vr1: job step finished with status $rc at $(date -Is)" >&2
  exit "$rc"
}
