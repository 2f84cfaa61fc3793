"""DeepSpeed's communication layer and accelerator: joining the job's process group, what device DeepSpeed picked."""

from __future__ import annotations

from datetime import timedelta

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout

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
