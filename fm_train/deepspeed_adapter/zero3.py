"""ZeRO-3: building a model already partitioned, its partitions, and its fp32 master weights.

Three reaches below DeepSpeed's public API, each checked (at import for methods, before use for
attributes DeepSpeed sets per instance):

- :func:`partitioned_construction`: ``deepspeed.zero.Init`` without its broadcast of each new
  parameter from rank 0 (the override of ``Init._zero_init_param``);
- :func:`zero3_partition`, :func:`unpartitioned_shape`: where a partitioned parameter keeps this rank's
  flat range (``ds_tensor``) and its real shape (``ds_shape``);
- :func:`share_fp32_master_partitions`: the fp32 master partition aliasing DeepSpeed intends but misses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from torch import nn

from fm_train.deepspeed_adapter.comm import ensure_adopted
from fm_train.deepspeed_adapter.overrides import (
    check_overrides,
    require_instance_attributes,
)

check_overrides(deepspeed.zero.Init, ["_zero_init_param", "_convert_to_deepspeed_param"])
# Named by share_fp32_master_partitions' reasoning: the branch it completes after the fact.
check_overrides(DeepSpeedZeroOptimizer_Stage3, ["_create_fp32_partitions"])


class _PartitionOnConstruction(deepspeed.zero.Init):
    """``deepspeed.zero.Init`` without its broadcast of every new parameter from rank 0.

    DeepSpeed broadcasts each parameter's constructor-time (random) value so that the ranks agree;
    :func:`fm_train.parallel.sharded_init.materialize_zero3_` then overwrites every partition with
    values each rank computes itself, so that broadcast (the whole model over the network, one tensor
    at a time) is waste. The hook's existence is checked at import (a renamed hook would leave the
    override unused: the broadcast back, slower, with the same result).
    """

    def _zero_init_param(self, param: nn.Parameter) -> None:  # DeepSpeed 0.19's per-parameter hook
        self._convert_to_deepspeed_param(param)
        param.partition()


def partitioned_construction(ds_config: dict[str, Any]) -> Any:
    """A context manager under which every module constructed is partitioned over the dp ranks at once.

    ``ds_config`` is the config ``deepspeed.initialize`` will get (its precision decides the dtype of
    the partitions). ``zero.Init`` reads the world size from DeepSpeed's comm layer, which adopts the
    existing torch process group here (``deepspeed.initialize`` would do the same later).
    """
    ensure_adopted(dist.get_backend())
    return _PartitionOnConstruction(config_dict_or_path=ds_config)


class Zero3Partition(NamedTuple):
    """This rank's range of a ZeRO-3 parameter: the flat range ``[index * per_rank, (index + 1) * per_rank)``
    of the flattened full tensor (the last rank's tail is zero padding)."""

    flat: torch.Tensor  # this rank's partition, ``per_rank`` elements
    per_rank: int
    index: int  # this rank's place in the parameter's partition group


def zero3_partition(param: nn.Parameter) -> Zero3Partition | None:
    """Where ``param`` (built under :func:`partitioned_construction`) keeps this rank's partition; None
    when it is not a ZeRO-3 partitioned parameter."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return None
    return Zero3Partition(part, int(part.ds_numel), dist.get_rank(group=param.ds_process_group))


def partition_elements(full_numel: int, partition: Zero3Partition) -> int:
    """How many of ``partition``'s elements hold values (not end padding) of a tensor of ``full_numel``."""
    return max(0, min(partition.per_rank, full_numel - partition.per_rank * partition.index))


def share_fp32_master_partitions(optimizer: Any) -> int:
    """Point each fp32 master sub-group of a ZeRO-3 optimizer at the parameter partition it copies.

    DeepSpeed's ZeRO-3 optimizer keeps a flat fp32 "master" copy of its parameter partition and copies
    it back after each step. When the parameters already are fp32 on the optimizer's device it means to
    use the partition itself (``_create_fp32_partitions``, "we don't need another copy of the weights"),
    but that branch compares a ``torch.device`` with the device *name* string, never equal in torch
    2.x, so every fp32 ZeRO-3 run clones its partition: 4 more bytes per parameter and rank (20
    instead of 16; TinyLlama-1.1B on 2 CPU ranks: 2.05 GiB per rank, bench/RESULTS_memory.md). This
    makes the alias after the fact, right after ``deepspeed.initialize`` and before any optimizer state
    or checkpoint exists; DeepSpeed supports it (its autocast path runs on it), and nothing here changes
    numbers (the ZeRO-3 equivalence and bit-exact resume tests check).

    Only sub-groups whose partition has the master's dtype, device and size are shared; offloaded or
    NVMe-swapped optimizers and other stages are left alone. Returns the bytes released.
    """
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        # A rename would make this a silent no-op (4 B/param more): refuse instead.
        require_instance_attributes(optimizer, ["fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat",
                                                "offload_optimizer", "swap_optimizer", "optimizer"])
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




def unpartitioned_shape(param: nn.Parameter) -> torch.Size:
    """The shape of ``param`` as the model sees it: a ZeRO-3 parameter's own tensor is an empty
    placeholder between gathers, and DeepSpeed records its real shape as ``ds_shape``."""
    return torch.Size(param.ds_shape) if hasattr(param, "ds_shape") else param.shape
