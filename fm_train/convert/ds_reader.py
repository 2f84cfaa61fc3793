"""fp32 weights out of a DeepSpeed step directory, one full tensor at a time.

Where DeepSpeed keeps the fp32 master weights (0.19 layout):

* ZeRO-0: ``mp_rank_XX_model_states.pt`` ``module`` (fp32 training: the weights themselves; bf16
  training: the bf16 copies; DeepSpeed stores the fp32 masters there unnamed, so they are not used);
* ZeRO-1/2: ``[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt`` ``single_partition_of_fp32_groups``
  (one flat fp32 partition per param group per dp rank) with ``param_slice_mappings`` (name -> start,
  numel inside that partition) and ``param_shapes`` in ``mp_rank_XX_model_states.pt``;
* ZeRO-3: ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` ``fp32_flat_groups``, where every
  parameter owns ``ceil(numel / dp)`` consecutive elements on each dp rank, in ``param_shapes`` order.

Files are opened with ``torch.load(mmap=True)``, so nothing is read until a parameter is asked for
and then only its slices: the resident set stays near one tensor plus one output shard, whatever
the model size (zero_to_fp32's ZeRO-1/2 path concatenates whole groups instead). Loads use
``weights_only=True`` with DeepSpeed's three plain record classes allowed, unless the caller trusts
the checkpoint. Tensor-parallel shards (``mp_rank_XX``, pipeline-major like DeepSpeed's grid) are
concatenated along the split dims the manifest records.
"""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from fm_train.convert.errors import ConvertError
from fm_train.convert.keymap import ds_to_fm, tp_split_dim

log = logging.getLogger("fm_train.convert")


def _safe_globals() -> list[Any]:
    """DeepSpeed classes that its checkpoints pickle: plain records, safe to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_ds_file(path: Path, *, trust: bool) -> dict[str, Any]:
    """``torch.load`` one DeepSpeed file memory-mapped; ``weights_only=True`` unless ``trust``."""
    if not path.is_file():
        raise ConvertError(f"{path.parent} lacks {path.name}: the checkpoint is incomplete (a rank's shard "
                           "was not written or not copied)")
    try:
        if trust:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConvertError(f"{path} does not load with weights_only=True ({first}); if you trust where this "
                           "checkpoint came from, pass --trust-checkpoint") from None


class _ModuleWeights:
    """ZeRO-0: whole tensors in the model-states ``module``."""

    def __init__(self, model_file: Path, trust: bool) -> None:
        self._module = load_ds_file(model_file, trust=trust)["module"]
        self.shapes = {n: t.shape for n, t in self._module.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._module[name].float()


class _Zero12Weights:
    """ZeRO-1/2: each parameter is a run of slices across the dp ranks' flat fp32 partitions."""

    def __init__(self, model_file: Path, optim_files: list[Path], trust: bool) -> None:
        groups = load_ds_file(model_file, trust=trust)["param_shapes"]
        self.shapes = {n: torch.Size(s) for g in groups for n, s in g.items()}
        self._group = {n: gi for gi, g in enumerate(groups) for n in g}
        self._flat: list[list[torch.Tensor]] = []
        self._slices: list[list[Mapping[str, Any]]] = []
        for f in optim_files:
            osd = load_ds_file(f, trust=trust)["optimizer_state_dict"]
            if "param_slice_mappings" not in osd:
                raise ConvertError(f"{f} has no param_slice_mappings (written by a DeepSpeed older than 0.10?)")
            self._flat.append(list(osd["single_partition_of_fp32_groups"]))
            self._slices.append(list(osd["param_slice_mappings"]))

    def get(self, name: str) -> torch.Tensor:
        g, shape = self._group[name], self.shapes[name]
        pieces = []
        for flat, slices in zip(self._flat, self._slices):
            frag = slices[g].get(name)
            if frag is not None:
                pieces.append(flat[g].narrow(0, frag.start, frag.numel))
        # One piece (dp = 1, or a parameter inside one partition): a view into the mapped file, no copy.
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.empty(0)
        if out.numel() != shape.numel():
            raise ConvertError(f"{name}: found {out.numel()} of {shape.numel()} elements across the dp partitions")
        return out.view(shape)


class _Zero3Weights:
    """ZeRO-3: each parameter is ``ceil(numel / dp)`` elements on every dp rank, padded at the end."""

    def __init__(self, model_file: Path, optim_files: list[Path], trust: bool) -> None:
        groups = load_ds_file(model_file, trust=trust)["param_shapes"]
        self.shapes = {n: torch.Size(s) for g in groups for n, s in g.items()}
        self._flat = [list(load_ds_file(f, trust=trust)["optimizer_state_dict"]["fp32_flat_groups"])
                      for f in optim_files]
        world = len(optim_files)
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (group, offset on each rank, numel per rank)
        for gi, g in enumerate(groups):
            offset = 0
            for n, s in g.items():
                per_rank = math.ceil(torch.Size(s).numel() / world)
                self._where[n] = (gi, offset, per_rank)
                offset += per_rank
            if offset > self._flat[0][gi].numel():
                raise ConvertError(f"ZeRO-3 group {gi}: shapes need {offset} elements per rank, "
                                   f"{optim_files[0].name} holds {self._flat[0][gi].numel()}")

    def get(self, name: str) -> torch.Tensor:
        g, offset, per_rank = self._where[name]
        shape = self.shapes[name]
        full = torch.cat([flat[g].narrow(0, offset, per_rank) for flat in self._flat])
        return full[: shape.numel()].view(shape)


class DeepSpeedWeights:
    """The fp32 weights of one step directory under fm_train names: ``shapes()`` then ``get(name)``."""

    def __init__(self, step_dir: Path, manifest: Mapping[str, Any], *, trust: bool = False) -> None:
        self.step_dir = Path(step_dir)
        self.manifest = manifest
        topo = manifest["topology"]
        self.tp, self.pp, self.dp, self.stage = topo["tp"], topo["pp"], topo["dp"], topo["zero_stage"]
        self.note = ""
        if self.stage == 0 and self.pp > 1:
            raise ConvertError(f"{step_dir}: ZeRO-0 pipeline checkpoints (layer_XX files) are not supported by "
                               "the converter yet; train pipelines with parallel.zero_stage=1")
        # One reader per model-parallel rank, pipeline-major (mp = pp_stage * tp + tp_rank).
        self._ranks = [self._open_mp_rank(mp, trust) for mp in range(self.tp * self.pp)]
        self._index: dict[str, list[tuple[int, str]]] = {}  # fm name -> [(mp rank, ds name)]
        for mp, reader in enumerate(self._ranks):
            for ds_name in reader.shapes:
                self._index.setdefault(ds_to_fm(ds_name, manifest), []).append((mp, ds_name))
        for name, parts in self._index.items():
            # A tied module lives on the first and the last pipeline stage: keep the first stage's copy.
            first_stage = min(mp // self.tp for mp, _ in parts)
            self._index[name] = [(mp, ds) for mp, ds in parts if mp // self.tp == first_stage]
        if manifest["config"]["model"]["tie_embeddings"]:
            # ZeRO-0 keeps the tied head as a second entry; Hugging Face stores the embedding only.
            self._index.pop("lm_head.weight", None)
        self._shapes = {n: self._merged_shape(n) for n in self._index}

    def _open_mp_rank(self, mp: int, trust: bool) -> Any:
        d, tag = self.step_dir, f"mp_rank_{mp:02d}"
        if self.stage == 0:
            if self.manifest["topology"]["precision"] != "fp32":
                self.note = ("ZeRO-0 with bf16/fp16 training: exported from the 16-bit training weights "
                             "(DeepSpeed does not name its fp32 master copies)")
            return _ModuleWeights(d / f"{tag}_model_states.pt", trust)
        if self.stage in (1, 2):
            prefix = "bf16_" if (d / f"bf16_zero_pp_rank_0_{tag}_optim_states.pt").exists() else ""
            optim = [d / f"{prefix}zero_pp_rank_{r}_{tag}_optim_states.pt" for r in range(self.dp)]
            self.note = f"fp32 master weights from ZeRO-{self.stage} optimizer partitions (dp={self.dp})"
            return _Zero12Weights(d / f"{tag}_model_states.pt", optim, trust)
        if self.stage == 3:
            optim = [d / f"zero_pp_rank_{r}_{tag}_optim_states.pt" for r in range(self.dp)]
            self.note = f"fp32 master weights from ZeRO-3 partitions (dp={self.dp})"
            return _Zero3Weights(d / f"zero_pp_rank_0_{tag}_model_states.pt", optim, trust)
        raise ConvertError(f"{d}: unknown ZeRO stage {self.stage} in the manifest")

    def _merged_shape(self, name: str) -> torch.Size:
        parts = self._index[name]
        shape = list(self._ranks[parts[0][0]].shapes[parts[0][1]])
        dim = tp_split_dim(name, self.manifest)
        if dim is not None and self.tp > 1:
            shape[dim] = sum(self._ranks[mp].shapes[ds][dim] for mp, ds in parts)
        return torch.Size(shape)

    def shapes(self) -> dict[str, torch.Size]:
        """Full (tp-merged) shape of every parameter, by fm_train name, in checkpoint order."""
        return dict(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        """The full fp32 tensor of ``name``: tp shards concatenated along the recorded dim."""
        parts = self._index[name]
        dim = tp_split_dim(name, self.manifest)
        if dim is None or self.tp == 1:
            # Replicated (or one shard): every tp rank holds the same values; the first is the copy.
            mp, ds = parts[0]
            return self._ranks[mp].get(ds)
        if len(parts) != self.tp:
            raise ConvertError(f"{name}: {len(parts)} tp shards in {self.step_dir}, expected {self.tp}")
        return torch.cat([self._ranks[mp].get(ds) for mp, ds in sorted(parts)], dim=dim)
