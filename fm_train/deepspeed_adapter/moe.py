"""DeepSpeed's expert-parallel bookkeeping for fm-train's own expert parallelism.

fm-train routes and dispatches tokens itself (:mod:`fm_train.parallel.expert_parallel`: dropless,
Qwen3-MoE's routing, the experts stacked as Hugging Face stores them); DeepSpeed's ``MoE`` layer has
its own gating (capacity-based, GShard's auxiliary loss) and its own expert layout. What DeepSpeed
does well, and fm-train uses, is everything around the experts' parameters once it knows them:

- it averages their gradients over the expert-data-parallel group (the ranks holding the same
  experts), divided by the whole data-parallel size, and every other gradient over the data-parallel
  group;
- ZeRO-1/2 partition their optimizer states over the expert-data-parallel group (``moe`` param
  groups), and the engine broadcasts them at start within that group only.

DeepSpeed learns about experts in three ways, which this module provides: the expert parameters
carry ``allreduce = False`` and ``group_name``; the process groups of that name are in
``deepspeed.utils.groups``' registry (here: fm-train's own groups, so that the all-to-all and the
gradient reduction use the same ranks); and the engine finds a ``deepspeed.moe.layer.MoE`` module in
the model, which is how it decides to take its expert paths at all. :class:`ExpertsMarker` is such a
module with no parameters and no forward.
"""

from __future__ import annotations

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
from collections.abc import Iterable, Sequence

from deepspeed.moe.layer import MoE
from deepspeed.utils import groups as ds_groups
from torch import nn
from torch.distributed import ProcessGroup

from fm_train.deepspeed_adapter.overrides import check_overrides

_REGISTRY = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
             "_EXPERT_DATA_PARALLEL_GROUP_RANKS")
_missing = [name for name in _REGISTRY if not isinstance(getattr(ds_groups, name, None), dict)]
if _missing:
    from fm_train.deepspeed_adapter.overrides import MissingOverrideError

    raise MissingOverrideError(f"fm-train's DeepSpeed adapter registers expert groups in deepspeed.utils.groups."
                               f"{', '.join(_missing)}, which the installed DeepSpeed lacks; port"
                               " fm_train/deepspeed_adapter/moe.py to this release")
check_overrides(MoE, ["set_deepspeed_parallelism"])


def group_name(ep: int) -> str:
    """DeepSpeed's name of the expert groups of size ``ep`` (its engine parses the size back out of it)."""
    return f"ep_size_{ep}"


def register_expert_groups(ep: int, ep_group: ProcessGroup, ep_ranks: Sequence[int], edp_group: ProcessGroup,
                           edp_ranks: Sequence[int]) -> str:
    """Make fm-train's expert-parallel and expert-data-parallel groups (this rank's) DeepSpeed's; returns
    their name. Every rank calls this before ``deepspeed.initialize``."""
    name = group_name(ep)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(ep_ranks)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(edp_ranks)
    return name


class ExpertsMarker(MoE):
    """Tells DeepSpeed's engine that the model has experts (it looks for a ``MoE`` module); holds no
    parameters, so nothing is saved or loaded for it, and is never called."""

    def __init__(self, *, ep: int, experts: int) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts of DeepSpeed's own
        self.ep_size = ep
        self.num_experts = experts
        self.num_local_experts = experts // ep
        self.expert_group_name = group_name(ep)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The groups are fm-train's, registered before ``deepspeed.initialize``: nothing to create."""
        if self.expert_group_name not in ds_groups._EXPERT_DATA_PARALLEL_GROUP:
            raise RuntimeError(f"expert groups {self.expert_group_name} were not registered before"
                               " deepspeed.initialize (fm_train.deepspeed_adapter.moe.register_expert_groups)")

    def forward(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise RuntimeError("ExpertsMarker only marks a model for DeepSpeed; it is never called")


def mark_expert_parameters(module: nn.Module, experts: Iterable[nn.Module], *, ep: int, total_experts: int) -> None:
    """Mark the parameters of ``experts`` (modules of ``module``) as expert parameters of the groups of size
    ``ep``, and give ``module`` the marker DeepSpeed's engine looks for."""
    name = group_name(ep)
    for expert_module in experts:
        for param in expert_module.parameters():
            param.allreduce = False  # deepspeed.moe.utils.is_moe_param
            param.group_name = name
    module.add_module("deepspeed_experts_marker", ExpertsMarker(ep=ep, experts=total_experts))


def named_param_groups(groups: list[dict]) -> list[dict]:
    """``groups`` with the ``name`` DeepSpeed's split into expert and dense optimizer groups requires."""
    return [{**g, "name": g.get("name", f"group_{i}")} for i, g in enumerate(groups)]
