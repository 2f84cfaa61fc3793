"""One model-parallel rank's fp32 master weights and Adam moments, as DeepSpeed 0.19 lays them out.

Each reader exposes ``shapes`` (DeepSpeed parameter name -> shape), ``get(name, key)`` (``key`` None
for the fp32 weight, else one of Adam's moments:
:func:`fm_train.deepspeed_adapter.optimizer_names.adam_moments`) and ``step()`` (Adam's step
count, or None when the checkpoint holds no optimizer state). Where the tensors live:

* ZeRO-0, fp32 training: weights in ``mp_rank_XX_model_states.pt`` ``module``, or for a pipeline in
  ``layer_LL-model_TT-model_states.pt`` (one file per layer and tp rank, written by dp rank 0); the
  torch optimizer's ``state_dict`` in ``mp_rank_XX_model_states.pt`` ``optimizer``, indexed by
  parameter position; the ``names`` list fm_train puts in each parameter group (and torch keeps in
  its state dict) names those positions;
* ZeRO-1/2, and bf16 ZeRO-0 (DeepSpeed's ``BF16_Optimizer``): ``[bf16_]zero_pp_rank_D_mp_rank_XX_
  optim_states.pt``: ``single_partition_of_fp32_groups`` (one flat fp32 partition per param group and
  dp rank) and ``base_optimizer_state`` (the moments, flat in the same layout), located per parameter
  by ``param_slice_mappings``; shapes in the model-states file's ``param_shapes``; with expert
  parallelism each ep rank's expert rows are partitioned over its own expert-data-parallel ranks;
* ZeRO-3: ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` ``fp32_flat_groups`` and the moments in
  ``optimizer_state_dict.state``, where every parameter owns ``ceil(numel / dp)`` consecutive elements
  on each dp rank, in ``param_shapes`` order.

Files are memory-mapped (or, in object storage, read by ranged GETs: :mod:`fm_train.storage.ranged_reads`):
a ``get`` reads only that parameter's slices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from fm_train.deepspeed_adapter.ckpt_files import load_ds_file
from fm_train.storage.errors import CheckpointError
from fm_train.deepspeed_adapter.optimizer_names import adam_moments


def _check_key(key: str | None) -> None:
    if key is not None and key not in adam_moments():
        raise ValueError(f"unknown optimizer state {key!r}; expected None or one of {adam_moments()}")


def _adam_states(base: Any) -> Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]]:
    """Per-group Adam state of a saved base optimizer: a torch ``state_dict`` or DeepSpeed's elastic list."""
    return base["state"] if isinstance(base, Mapping) else base


def _group_state(states: Any, group: int) -> Mapping[str, Any]:
    """The saved Adam state of param group ``group`` ({} when absent: saved before the first step)."""
    if isinstance(states, Mapping):
        return states.get(group, {})
    return states[group] if group < len(states) else {}


def _step_of(state: Mapping[str, Any] | None) -> int | None:
    if not state or "step" not in state:
        return None
    step = state["step"]
    return int(step.item() if hasattr(step, "item") else step)  # a tensor, a RangedTensor, or a number


class Zero0Rank:
    """fp32 ZeRO-0: whole tensors in ``module`` (or pipeline layer files) and a plain torch optimizer."""

    def __init__(self, model_file: Path, layer_files: Mapping[int, Path], tied_layers: Mapping[str, int],
                 trust: bool) -> None:
        states = load_ds_file(model_file, trust=trust)
        self._module: Mapping[str, torch.Tensor] | None = states.get("module")
        self._layer_files, self._tied_layers, self._trust = layer_files, tied_layers, trust
        self._layers: dict[int, Mapping[str, torch.Tensor]] = {}
        optimizer = states.get("optimizer") or {}
        # Position in the optimizer -> parameter name, from fm_train's ``names`` in each group.
        self._state_of: dict[str, Mapping[str, Any]] = {}
        names: list[str] = []
        for group in optimizer.get("param_groups", []):
            if "names" not in group or len(group["names"]) != len(group["params"]):
                names = []
                break
            names += group["names"]
            for index, name in zip(group["params"], group["names"]):
                self._state_of[name] = optimizer["state"].get(index, {})
        if self._module is not None:
            self.shapes = {n: t.shape for n, t in self._module.items()}
        elif names:
            # A pipeline stage: its parameters are exactly those its optimizer names.
            self.shapes = {n: self._weight(n).shape for n in names}
        else:
            raise CheckpointError(f"{model_file}: a ZeRO-0 pipeline checkpoint whose optimizer does not name its "
                               "parameters (not written by fm-train?); cannot tell which layers this stage holds")
        self._where = model_file

    def _layer(self, index: int) -> Mapping[str, torch.Tensor]:
        if index not in self._layers:
            if index not in self._layer_files:
                raise CheckpointError(f"{self._where.parent} lacks the file of pipeline layer {index} (layer_{index:02d}-*)")
            self._layers[index] = load_ds_file(self._layer_files[index], trust=self._trust)
        return self._layers[index]

    def _weight(self, name: str) -> torch.Tensor:
        if self._module is not None:
            return self._module[name]
        head, _, rest = name.partition(".")
        if head == "tied_modules":
            # A tied module's weights are saved once, in the file of the layer that first built it.
            key, _, rest = rest.partition(".")
            return self._layer(self._tied_layers[key])[rest]
        return self._layer(int(head))[rest]

    def get(self, name: str, key: str | None = None) -> torch.Tensor:
        _check_key(key)
        if key is None:
            return self._weight(name).float()
        state = self._state_of.get(name)
        if not state or key not in state:
            raise CheckpointError(f"{self._where}: no optimizer state {key!r} for {name!r} (saved before the first "
                               "step, or by an optimizer that is not Adam)")
        return state[key].float().view(self.shapes[name])

    def step(self) -> int | None:
        return next((s for s in map(_step_of, self._state_of.values()) if s is not None), None)


class Zero12Rank:
    """ZeRO-1/2 and ``BF16_Optimizer``: each parameter is a run of slices across the dp ranks' partitions."""

    def __init__(self, model_file: Path, optim_files: list[Path], trust: bool, *,
                 is_expert: Callable[[str], bool] | None = None, ep: int = 1) -> None:
        groups = load_ds_file(model_file, trust=trust)["param_shapes"]
        self.shapes = {n: torch.Size(s) for g in groups for n, s in g.items()}
        self._group = {n: gi for gi, g in enumerate(groups) for n in g}
        # Expert parameters (ep > 1): every ep rank saved its own rows under the same name, partitioned
        # over its expert-data-parallel ranks, i.e. dp ranks r, r + ep, r + 2 ep, ... (fm-train's
        # Topology); the full tensor is the ep ranks' rows in order.
        if len(optim_files) % ep:
            raise CheckpointError(f"{model_file}: ep={ep} does not divide its {len(optim_files)} dp partitions")
        self._ep = ep
        self._experts = frozenset(n for n in self.shapes if is_expert is not None and is_expert(n))
        for n in self._experts:
            self.shapes[n] = torch.Size([self.shapes[n][0] * ep, *self.shapes[n][1:]])
        self._flat: list[list[torch.Tensor]] = []
        self._slices: list[list[Mapping[str, Any]]] = []
        self._states: list[Any] = []
        for f in optim_files:
            osd = load_ds_file(f, trust=trust)["optimizer_state_dict"]
            if "param_slice_mappings" not in osd:
                raise CheckpointError(f"{f} has no param_slice_mappings (written by a DeepSpeed older than 0.10?)")
            self._flat.append(list(osd["single_partition_of_fp32_groups"]))
            self._slices.append(list(osd["param_slice_mappings"]))
            self._states.append(_adam_states(osd.get("base_optimizer_state") or {"state": {}}))
        self._where = optim_files[0]

    def _flat_of(self, rank: int, group: int, key: str | None) -> torch.Tensor:
        if key is None:
            return self._flat[rank][group]
        state = _group_state(self._states[rank], group)
        if key not in state:
            raise CheckpointError(f"{self._where}: no optimizer state {key!r} (saved before the first step?)")
        return state[key]

    def get(self, name: str, key: str | None = None) -> torch.Tensor:
        _check_key(key)
        if name not in self._experts:
            return self._gather(name, key, range(len(self._slices)), self.shapes[name])
        shape = self.shapes[name]
        local = torch.Size([shape[0] // self._ep, *shape[1:]])
        dp = len(self._slices)
        return torch.cat([self._gather(name, key, range(r, dp, self._ep), local) for r in range(self._ep)])

    def _gather(self, name: str, key: str | None, ranks: range, shape: torch.Size) -> torch.Tensor:
        """``name``'s slices in the partitions of dp ``ranks``, in order, as one tensor of ``shape``."""
        g = self._group[name]
        pieces = []
        for rank in ranks:
            frag = self._slices[rank][g].get(name)
            if frag is not None:
                pieces.append(self._flat_of(rank, g, key).narrow(0, frag.start, frag.numel))
        # One piece (dp = 1, or a parameter inside one partition): a view into the mapped file, no copy.
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.empty(0)
        if out.numel() != shape.numel():
            raise CheckpointError(f"{name}: found {out.numel()} of {shape.numel()} elements across the dp partitions"
                                  f" {list(ranks)}")
        return out.float().view(shape)

    def step(self) -> int | None:
        return _step_of(_group_state(self._states[0], 0))


class Zero3Rank:
    """ZeRO-3: each parameter is ``ceil(numel / dp)`` elements on every dp rank, padded at the end."""

    def __init__(self, model_file: Path, optim_files: list[Path], trust: bool) -> None:
        groups = load_ds_file(model_file, trust=trust)["param_shapes"]
        self.shapes = {n: torch.Size(s) for g in groups for n, s in g.items()}
        self._flat: list[list[torch.Tensor]] = []
        self._states: list[Mapping[int, Mapping[str, Any]]] = []
        for f in optim_files:
            osd = load_ds_file(f, trust=trust)["optimizer_state_dict"]
            self._flat.append(list(osd["fp32_flat_groups"]))
            self._states.append((osd.get("optimizer_state_dict") or {}).get("state", {}))
        world = len(optim_files)
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (group, offset on each rank, numel per rank)
        for gi, g in enumerate(groups):
            offset = 0
            for n, s in g.items():
                per_rank = math.ceil(torch.Size(s).numel() / world)
                self._where[n] = (gi, offset, per_rank)
                offset += per_rank
            if offset > self._flat[0][gi].numel():
                raise CheckpointError(f"ZeRO-3 group {gi}: shapes need {offset} elements per rank, "
                                   f"{optim_files[0].name} holds {self._flat[0][gi].numel()}")
        self._file = optim_files[0]

    def get(self, name: str, key: str | None = None) -> torch.Tensor:
        _check_key(key)
        g, offset, per_rank = self._where[name]
        shape = self.shapes[name]
        if key is None:
            flats = [flat[g] for flat in self._flat]
        else:
            if any(key not in _group_state(st, g) for st in self._states):
                raise CheckpointError(f"{self._file}: no optimizer state {key!r} (saved before the first step?)")
            flats = [st[g][key] for st in self._states]
        full = torch.cat([flat.narrow(0, offset, per_rank) for flat in flats])
        return full[: shape.numel()].float().view(shape)

    def step(self) -> int | None:
        return _step_of(_group_state(self._states[0], 0))
