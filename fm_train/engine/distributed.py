"""Process-group start and clean teardown for a worker."""

from __future__ import annotations

import os

import torch.distributed as dist

from fm_train.deepspeed_adapter.comm import (
    DEFAULT_PG_TIMEOUT,
    accelerator_name,
    adopt_process_group,
)
from fm_train.dist.device import DeviceChoice, DeviceError, activate, detect_device
from fm_train.dist.env import RankEnv
from fm_train.dist.rendezvous import join_process_group


def init_distributed(env: RankEnv) -> str:
    """Join the job's process group through DeepSpeed: nccl when this process has a GPU, else gloo.

    Returns the backend. The device (:func:`fm_train.dist.device.choose_device`: ``cuda:LOCAL_RANK``)
    is made current before the group exists, so that nccl binds each rank to its own GPU. A failure to
    connect is a :class:`~fm_train.dist.rendezvous.RendezvousError` naming addresses, ports and fixes.
    """
    env.export()
    choice = activate_device(env)
    # Our store listens on MASTER_ADDR only (torch's own binds every interface); DeepSpeed adopts the group.
    # A group the caller already made (a test harness, an embedding program) is adopted as it is.
    if not dist.is_initialized():
        join_process_group(env, choice.backend, timeout=DEFAULT_PG_TIMEOUT)
    adopt_process_group(choice.backend, rank=env.rank, world_size=env.world_size, port=env.master_port)
    return choice.backend


def activate_device(env: RankEnv) -> DeviceChoice:
    """Choose and activate this rank's device, and check that DeepSpeed agrees with the choice.

    DeepSpeed picks its device on its own (``cuda:LOCAL_RANK``) and its accelerator too
    (``DS_ACCELERATOR`` or detection); were it to pick another one than ours (say an XPU or CPU
    build on a GPU node), every engine buffer would land on a different device than the model.
    Better to stop here with the fix.
    """
    choice = detect_device(env.local_rank)
    activate(choice)
    if choice.index is not None and choice.index != env.local_rank:
        # One GPU visible to this process (srun-style binding): DeepSpeed's engine selects
        # cuda:LOCAL_RANK itself, so LOCAL_RANK must name the GPU this process actually has.
        os.environ["LOCAL_RANK"] = str(choice.index)
    ds_name = accelerator_name()
    if ds_name != choice.accelerator:
        raise DeviceError(f"fm-train chose the {choice.accelerator} device but DeepSpeed's accelerator is {ds_name!r};"
                          f" set DS_ACCELERATOR={choice.accelerator} (or unset it) in the workers' environment")
    return choice


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
