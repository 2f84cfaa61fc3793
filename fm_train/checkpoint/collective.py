"""The few process-group calls checkpoint code makes, each a no-op (or the trivial answer) without one.

Saving and resuming run on every rank with a process group; the converter and unit tests run them in
one process without any. Object collectives use the default group.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def initialized() -> bool:
    """True inside a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if initialized() else 0


def world() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    """Wait for every rank (returns at once without a process group)."""
    if initialized():
        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
