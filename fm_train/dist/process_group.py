"""Clean process-group teardown for a worker.

The start is :func:`fm_train.deepspeed_adapter.comm.init_distributed` (it joins through
:func:`fm_train.dist.rendezvous.join_process_group`, then DeepSpeed adopts the group).
"""

from __future__ import annotations

import torch.distributed as dist


def shutdown_distributed(*, barrier: bool = True) -> None:
    """Barrier, then destroy the process group.

    Without the barrier a fast rank tears its group down while a slow one is still in a collective;
    without the teardown, gloo/DeepSpeed background threads can outlive the interpreter and abort it
    at exit (``terminate called without an active exception``, seen with bf16 runs on CPU). After a failure
    pass ``barrier=False``: the other ranks may be waiting in a different collective, and the
    launcher, not a hung barrier, should learn about it.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
