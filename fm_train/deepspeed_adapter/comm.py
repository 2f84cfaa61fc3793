"""DeepSpeed's communication layer and accelerator: joining the job's process group, what device DeepSpeed picked.

A worker starts with :func:`init_distributed` and ends with :func:`fm_train.dist.process_group.shutdown_distributed`.
"""

from __future__ import annotations

import os
from datetime import timedelta

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout
import torch.distributed as dist

from fm_train.dist.device import DeviceChoice, DeviceError, activate, detect_device
from fm_train.dist.env import RankEnv
from fm_train.dist.rendezvous import join_process_group

#: DeepSpeed's default process-group timeout (what ``deepspeed.init_distributed`` would use).
DEFAULT_PG_TIMEOUT: timedelta = default_pg_timeout


def adopt_process_group(backend: str, *, rank: int | None = None, world_size: int | None = None,
                        port: int | None = None) -> None:
    """Make DeepSpeed's comm layer adopt the torch process group that already exists (no MPI discovery).

    ``rank``/``world_size``/``port`` are passed when known (a worker); DeepSpeed reads them from the
    existing group otherwise.
    """
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size, "distributed_port": port}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)


def ensure_adopted(backend: str) -> None:
    """:func:`adopt_process_group` unless DeepSpeed's comm layer is initialised already."""
    if not deepspeed.comm.is_initialized():
        adopt_process_group(backend)


def accelerator_name() -> str:
    """The device name of the accelerator DeepSpeed chose (``DS_ACCELERATOR`` or its detection): cuda, cpu, ..."""
    return str(get_accelerator().device_name())


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
