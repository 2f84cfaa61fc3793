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

import torch
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


#: DeepSpeed's key infix of one expert's tensors in its per-expert checkpoint files (it renumbers the
#: expert after it: local index in the model, global index in the file name and keys).
_EXPERT_INFIX = "deepspeed_moe.experts.deepspeed_experts."


class ExpertsMarker(MoE):
    """Stands for one stacked experts module in DeepSpeed's eyes: its engine finds a ``MoE`` module (and
    takes its expert paths), and saves and loads the experts one file per global expert.

    The marker holds no parameter of its own. Its state dict presents the owner's rows as DeepSpeed
    names a ``MoE`` layer's experts (``deepspeed_moe.experts.deepspeed_experts.<local>.<param>``), which
    is what DeepSpeed's MoE checkpoint code writes (``layer_<l>_expert_<global>_mp_rank_<mp>_model_
    states.pt``, by the expert-data-parallel rank 0 of each expert) and reads back; loading writes
    them into the owner's rows. It is never called.
    """

    def __init__(self, owner: nn.Module, *, ep: int, experts: int) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts of DeepSpeed's own
        self.ep_size = ep
        self.num_experts = experts
        self.num_local_experts = experts // ep
        self.expert_group_name = group_name(ep)
        object.__setattr__(self, "_owner", owner)  # not a child: the owner is the model's own module

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The groups are fm-train's, registered before ``deepspeed.initialize``: nothing to create."""
        if self.expert_group_name not in ds_groups._EXPERT_DATA_PARALLEL_GROUP:
            raise RuntimeError(f"expert groups {self.expert_group_name} were not registered before"
                               " deepspeed.initialize (fm_train.deepspeed_adapter.moe.register_expert_groups)")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for pname, param in self._owner.named_parameters(recurse=False):
            for local in range(param.shape[0]):
                value = param[local] if keep_vars else param.detach()[local]
                destination[f"{prefix}{_EXPERT_INFIX}{local}.{pname}"] = value

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # The owner's pre-hook (:func:`_experts_from_marker_keys`) consumed these keys; nothing is left here.
        return

    def forward(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise RuntimeError("ExpertsMarker only marks a model for DeepSpeed; it is never called")


_MARKER = "deepspeed_experts_marker"


def _only_marker_keys(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """State-dict post-hook of a stacked experts module: its tensors appear under the marker's per-expert
    keys only, so that the model file, which DeepSpeed writes from one rank, holds no expert tensor (each
    rank's experts go to their own files)."""
    for pname, _param in module.named_parameters(recurse=False):
        state_dict.pop(f"{prefix}{pname}", None)


def _experts_from_marker_keys(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """Load pre-hook of a stacked experts module: build its parameters from the per-expert keys DeepSpeed
    loaded from this rank's expert files, then drop those keys."""
    marker_prefix = f"{prefix}{_MARKER}.{_EXPERT_INFIX}"
    for pname, param in module.named_parameters(recurse=False):
        rows = [state_dict.pop(f"{marker_prefix}{local}.{pname}", None) for local in range(param.shape[0])]
        if all(r is not None for r in rows):
            state_dict[f"{prefix}{pname}"] = torch.stack(rows)


def mark_expert_parameters(experts: Iterable[nn.Module], *, ep: int, total_experts: int) -> None:
    """Mark the parameters of each stacked experts module as expert parameters of the groups of size ``ep``
    and give it the :class:`ExpertsMarker` DeepSpeed's engine and checkpoints go by."""
    name = group_name(ep)
    for module in experts:
        for param in module.parameters(recurse=False):
            param.allreduce = False  # deepspeed.moe.utils.is_moe_param
            param.group_name = name
        module.add_module(_MARKER, ExpertsMarker(module, ep=ep, experts=total_experts))
        module.register_state_dict_post_hook(_only_marker_keys)
        module.register_load_state_dict_pre_hook(_experts_from_marker_keys)


def named_param_groups(groups: list[dict]) -> list[dict]:
    """``groups`` with the ``name`` DeepSpeed's split into expert and dense optimizer groups requires."""
    return [{**g, "name": g.get("name", f"group_{i}")} for i, g in enumerate(groups)]
