"""Process-group start and clean teardown for a worker."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from fm_train.dist.env import RankEnv


def init_distributed(env: RankEnv) -> str:
    """Join the job's process group through DeepSpeed: nccl when this process has a GPU, else gloo.

    Returns the backend. The local GPU is selected by ``env.local_rank`` before the group exists, so
    that nccl binds each rank to its own device.
    """
    env.export()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=env.rank,
                               world_size=env.world_size, distributed_port=env.master_port)
    return backend


def shutdown_distributed(*, barrier: bool = True) -> None:
    """Barrier, then destroy the process group.

    Without the barrier a fast rank tears its group down while a slow one is still in a collective;
    without the teardown, gloo/DeepSpeed background threads can outlive the interpreter and abort it
    at exit (``terminate called without an active exception``; see CPU_FACTS.md). After a failure
    pass ``barrier=False``: the other ranks may be waiting in a different collective, and the
    launcher, not a hung barrier, should learn about it.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()

