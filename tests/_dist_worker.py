"""Entry point of one rank for `distributed.run_distributed` (not a test module)."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    case, kwargs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    from megatron_vr1 import platform

    platform.setup()
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    import dist_cases

    result = getattr(dist_cases, case)(**kwargs)
    Path(out).write_text(json.dumps(result))
    if dist.is_initialized():  # a case that shut a vLLM engine down has no group any more
        dist.barrier()
        dist.destroy_process_group()
