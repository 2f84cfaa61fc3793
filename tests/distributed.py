"""Run a function in N real processes joined by a gloo process group, and surface their exceptions.

Usage (``fn`` must be importable, i.e. defined at module level)::

    results = run_distributed(my_check, world_size=2, args=(tmp_path,))

Each process gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set and, unless
``init_process_group=False``, an initialised gloo default group. The return values come back as a
list indexed by rank; the first failure is re-raised in the parent with its rank and traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: Sequence[Any], init_pg: bool, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if init_pg and dist.is_initialized():
            # Meet the other ranks before tearing down: a rank that destroys its group while a peer is
            # still inside a collective aborts the process ("terminate called without an active exception").
            # monitored_barrier gives up (and raises) when a peer never arrives, e.g. after its failure.
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            except RuntimeError:
                pass
            dist.destroy_process_group()
        # Leave without the interpreter's teardown: a native gloo/DeepSpeed thread still alive at
        # static-destructor time now and then aborts a rank whose result is already queued (SIGABRT).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), *, init_process_group: bool = True,
                    timeout_s: float = 600.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results or raise the first error."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = mp.start_processes(_entry, args=(fn, world_size, port, tuple(args), init_process_group, queue),
                               nprocs=world_size, join=False, start_method="spawn")
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while not procs.join(timeout=timeout_s):
            pass
    except Exception as exc:  # a process died without reporting (segfault, os._exit)
        errors.append(f"a rank died: {exc}")
    while not queue.empty():
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = payload
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    if errors:
        raise RuntimeError("\n".join(errors))
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RuntimeError(f"ranks {missing} returned no result")
    return [results[r] for r in range(world_size)]
