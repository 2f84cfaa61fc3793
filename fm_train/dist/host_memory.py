"""glibc's allocator for a CPU training rank: activations reused from the heap, growth past the working set returned.

Left alone, glibc serves blocks above a threshold with their own ``mmap`` and raises that threshold
(up to 32 MiB) whenever such a block is freed; blocks below it come from the heap, which keeps what is
freed, so a step reuses the last one's pages. Under ZeRO-3 that heap grew by 0.2-0.3 GiB per step on a
125M model. Fixing the threshold low (128 KiB, the ``small`` policy) kept RSS flat, but made every
activation a fresh ``mmap`` whose pages fault in zeroed on each step (a third of the step's CPU time on
the local recipe's model); a fixed high threshold was slower than glibc's own under ZeRO-3. So the
policy here (``reuse``, the default) leaves glibc's thresholds alone and bounds what the heap may keep:
after each optimizer step, when only the model and optimizer states are live, RSS is compared with its
high-water mark over the first ``SETTLE_STEPS`` steps (the step's own working set), and only when it
has grown past it by ``GROWTH`` are the heap's free pages returned to the OS (``malloc_trim``; trimming
every step would cost the page faults that reuse saves). ``bench/RESULTS.md`` has the figures.

What the heap keeps for reuse within a step is memory the plan does not count (about 1 GiB per rank at
125M parameters with two ZeRO-3 blocks gathered; TinyLlama-1.1B on 2 ranks of a 24 GiB host outgrew the
host with it, where ``small`` keeps RSS at the plan). So ``reuse`` is the default only where the plan
leaves room for it: the planned peak times :data:`REUSE_HEADROOM` within the rank's memory budget
(:func:`policy_for`); a tighter plan gets ``small``. ``FM_TRAIN_HOST_MALLOC`` picks a policy outright:
``reuse``, ``small`` (the 128 KiB threshold, no trim) or ``glibc`` (untouched). GPU ranks are left
alone: their tensors are not on this heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Literal

POLICY_ENV = "FM_TRAIN_HOST_MALLOC"
Policy = Literal["reuse", "small", "glibc"]
POLICIES: tuple[Policy, ...] = ("reuse", "small", "glibc")

SMALL_MMAP_THRESHOLD = 128 << 10
SETTLE_STEPS = 3  # the working set's high-water mark is taken over these first steps
GROWTH = 0.05  # RSS beyond the mark by this share is fragmentation: trimmed
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
#: ``reuse`` needs the planned peak times this within the budget (measured: the heap kept up to 0.7x the
#: plan's peak beyond it at 125M, bench/RESULTS.md).
REUSE_HEADROOM = 1.75


def requested_policy() -> Policy | None:
    """The policy ``FM_TRAIN_HOST_MALLOC`` asks for, or None (chosen by the plan); ValueError names the
    variable for an unknown one."""
    chosen = os.environ.get(POLICY_ENV) or None
    if chosen is not None and chosen not in POLICIES:
        raise ValueError(f"{POLICY_ENV}={chosen!r} is not one of {', '.join(POLICIES)}")
    return chosen  # type: ignore[return-value]


def policy_for(plan_gib: float | None, budget_gib: float | None) -> Policy:
    """The default policy for a rank whose planned peak is ``plan_gib`` of a ``budget_gib`` budget: ``reuse``
    (fast) where the plan leaves it room, else ``small`` (RSS at the plan); ``reuse`` when either is unknown."""
    if plan_gib is None or budget_gib is None or plan_gib * REUSE_HEADROOM <= budget_gib:
        return "reuse"
    return "small"


class HostMemory:
    """This process's allocator policy; :meth:`trim` is called after every optimizer step."""

    def __init__(self, libc: ctypes.CDLL | None, policy: Policy) -> None:
        self._libc, self.policy = libc, policy
        self._steps, self._mark, self.trims = 0, 0, 0

    @classmethod
    def configure(cls, policy: str | None = None, *, gpu: bool, plan_gib: float | None = None,
                  budget_gib: float | None = None) -> "HostMemory":
        """Apply ``policy`` (default: ``FM_TRAIN_HOST_MALLOC``, else :func:`policy_for` the plan and budget) to
        this process; a no-op one on a GPU rank, off Linux, or without glibc. ValueError names the variable
        (or the argument) for an unknown policy."""
        chosen = policy if policy is not None else requested_policy() or policy_for(plan_gib, budget_gib)
        if chosen not in POLICIES:
            raise ValueError(f"allocator policy {chosen!r} is not one of {', '.join(POLICIES)}")
        if gpu or not sys.platform.startswith("linux") or chosen == "glibc":
            return cls(None, chosen)  # type: ignore[arg-type]
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if chosen == "small":  # setting the threshold also turns glibc's dynamic raise off
                libc.mallopt(_M_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD)
            libc.malloc_trim  # noqa: B018 - glibc has it; musl and others raise AttributeError here
        except (OSError, AttributeError):  # not glibc: nothing to tune
            return cls(None, chosen)  # type: ignore[arg-type]
        return cls(libc, chosen)  # type: ignore[arg-type]

    def trim(self) -> None:
        """After an optimizer step: give the heap's free pages back to the OS when RSS outgrew the working
        set's mark (``reuse`` policy only; one read of ``/proc/self/statm`` otherwise)."""
        if self._libc is None or self.policy != "reuse":
            return
        rss = _rss_bytes()
        self._steps += 1
        if self._steps <= SETTLE_STEPS:
            self._mark = max(self._mark, rss)
        elif rss > self._mark * (1 + GROWTH):
            self._libc.malloc_trim(0)
            self.trims += 1


def _rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
