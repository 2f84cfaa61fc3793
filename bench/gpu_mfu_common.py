"""The micro-batch search rules of ``bench/gpu_mfu.py``, shared with the processes it spawns
(``gpu_mfu_runs.py``): pure, torch-free, unit-tested on CPU (``tests/test_device.py``)."""

from __future__ import annotations

from typing import Callable, Iterable


def pick_micro_batch(candidates: Iterable[int], fits: Callable[[int], bool]) -> int | None:
    """The largest candidate that fits, trying them from small to large and stopping at the first failure.

    Stopping matters: after an out-of-memory at 4, trying 8 costs time and a larger spike for nothing.
    None when even the smallest does not fit.
    """
    best = None
    for mb in sorted(set(candidates)):
        if not fits(mb):
            break
        best = mb
    return best


def next_smaller(candidates: Iterable[int], micro_batch: int) -> int | None:
    """The largest candidate below ``micro_batch`` (None when there is none)."""
    smaller = [c for c in candidates if c < micro_batch]
    return max(smaller) if smaller else None
