"""Let ZeRO-3 update fp32 parameters in place instead of through a second fp32 copy.

DeepSpeed's ZeRO-3 optimizer keeps a flat "master" copy of its parameter partition for the optimizer
to update, then copies it back. When the parameters already are fp32 on the optimizer's device it is
meant to use the partition itself (``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions``, the
branch commented "we don't need another copy of the weights"), but that branch compares a
``torch.device`` with the device *name* string, which is never equal in torch 2.x
(``torch.device("cpu") == "cpu"`` is False), so every fp32 ZeRO-3 run clones its partition: 4 more
bytes per parameter and rank (20 instead of 16). For TinyLlama-1.1B on 2 CPU ranks that is 2.05 GiB
per rank, the difference between fitting a 24 GiB machine and not (bench/RESULTS_memory.md).

:func:`share_fp32_master_partitions` makes the aliasing DeepSpeed intended after the fact, right after
``deepspeed.initialize`` and before any optimizer state or checkpoint exists. DeepSpeed supports the
alias (its autocast path runs on it: the step's write-back ``fp16.data.copy_(fp32.data)`` is then a
copy onto itself); nothing here changes numbers, which the ZeRO-3 equivalence and bit-exact resume
tests check.
"""

from __future__ import annotations

from typing import Any


def share_fp32_master_partitions(optimizer: Any) -> int:
    """Point each fp32 master sub-group of a ZeRO-3 optimizer at the parameter partition it copies.

    Only sub-groups whose partition has the master's dtype, device and size are shared; offloaded or
    NVMe-swapped optimizers and other stages are left alone. Returns the bytes released.
    """
    low = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    master = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if low is None or master is None or getattr(optimizer, "offload_optimizer", False):
        return 0
    if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "optimizer", None) is None:
        return 0
    released = 0
    for i, (partition, copy) in enumerate(zip(low, master)):
        if (partition is None or copy is partition or partition.dtype != copy.dtype
                or partition.device != copy.device or partition.numel() != copy.numel()
                or copy in optimizer.optimizer.state):  # a state keyed by the copy: too late to swap
            continue
        partition.ds_id = copy.ds_id
        partition.requires_grad = copy.requires_grad
        master[i] = partition
        released += copy.numel() * copy.element_size()
    return released
